"""`corral vm build-kernel`: a minimal guest kernel built from Debian's kernel source package.

Debian's generic kernel boots in ~4.5 s under TCG, most of it probing hardware a micro-VM does
not have. This recipe builds a kernel with only what the guest uses (guest/kernel.config on top
of ``allnoconfig``: virtio-mmio, virtio-console, virtio-net, 9p, no modules), once, into
``<cache>/minimal-kernel/<key>/vmlinux`` where ``key`` hashes the source tarball and the config.
``current`` points at the newest build and the backend boots it when it exists. Building takes
about 8 minutes on 2 cores and is never started implicitly.

    apt-get install linux-source-6.1 flex bison bc libelf-dev gcc make
    python -m corral.backends.microvm.kernel build
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from importlib import resources
from typing import IO

from corral.errors import BackendUnavailableError, CorralError

SOURCE_GLOB = "/usr/src/linux-source-*.tar.xz"
BUILD_TOOLS = ("make", "gcc", "flex", "bison", "bc")
APT_HINT = "apt-get install linux-source-6.1 flex bison bc libelf-dev gcc make"
SUBDIR = "minimal-kernel"


def cache_root(cache_dir: str) -> str:
    return os.path.join(cache_dir, SUBDIR)


def built_kernel(cache_dir: str) -> str | None:
    """The minimal kernel's vmlinux if the recipe has been run, else None."""
    path = os.path.join(cache_root(cache_dir), "current", "vmlinux")
    return path if os.path.isfile(path) else None


def kernel_release(vmlinux: str) -> str:
    with open(os.path.join(os.path.dirname(vmlinux), "release")) as f:
        return f.read().strip()


def config_fragment() -> bytes:
    return (resources.files("corral.backends.microvm") / "guest" / "kernel.config").read_bytes()


def find_source() -> str:
    """The newest kernel source tarball Debian's linux-source-X.Y package installed."""
    found = sorted(glob.glob(SOURCE_GLOB), key=_version_key)
    if not found:
        raise BackendUnavailableError(
            f"no Debian kernel source ({SOURCE_GLOB})", remediation=APT_HINT
        )
    return found[-1]


def build(
    cache_dir: str,
    *,
    source: str | None = None,
    jobs: int = os.cpu_count() or 1,
    keep_tree: bool = False,
    log: str | None = None,
) -> str:
    """Build (or find cached) the minimal kernel; returns its vmlinux path and makes it current.
    ``log`` receives the compiler output (default: a file next to the build)."""
    source = source or find_source()
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        raise BackendUnavailableError(
            f"building the guest kernel needs {', '.join(missing)}", remediation=APT_HINT
        )
    fragment = config_fragment()
    key = _build_key(source, fragment)
    root = cache_root(cache_dir)
    target = os.path.join(root, key)
    vmlinux = os.path.join(target, "vmlinux")
    if not os.path.isfile(vmlinux):
        tree = os.path.join(root, f"build-{key}")
        log = log or os.path.join(root, f"build-{key}.log")
        os.makedirs(root, mode=0o755, exist_ok=True)
        _compile(source, fragment, tree, jobs, log)
        staging = f"{target}.{os.getpid()}"
        os.makedirs(staging, exist_ok=True)
        shutil.copy(os.path.join(tree, "vmlinux"), os.path.join(staging, "vmlinux"))
        shutil.copy(os.path.join(tree, ".config"), os.path.join(staging, "config"))
        with open(os.path.join(staging, "release"), "w") as f:
            f.write(_release(tree) + "\n")
        os.replace(staging, target)
        if not keep_tree:
            shutil.rmtree(tree, ignore_errors=True)
    verify_boots(vmlinux, cache_dir)
    current = os.path.join(root, "current")
    tmp_link = f"{current}.{os.getpid()}"
    os.symlink(key, tmp_link)
    os.replace(tmp_link, current)  # atomic: a booting backend sees the old or the new kernel
    return vmlinux


def verify_boots(vmlinux: str, cache_dir: str) -> None:
    """Boot the new kernel once with the real guest before the backend may use it: a kernel that
    cannot run the agent never becomes ``current``."""
    from corral.backends.microvm import image
    from corral.backends.microvm.qemu import Machine
    from corral.backends.microvm.vm import MicroVM
    from corral.policy.filesystem import FilesystemPolicy

    guest = image.minimal_guest(vmlinux, cache_dir)
    try:
        vm = MicroVM.boot(FilesystemPolicy((), ()), Machine("tcg", 256, 1), guest, boot_timeout=30)
    except (CorralError, TimeoutError) as exc:
        raise CorralError(
            f"the kernel built at {vmlinux} does not run the guest agent, so it was not made "
            f"current: {exc}"
        ) from exc
    vm.shutdown()


def _compile(source: str, fragment: bytes, tree: str, jobs: int, log: str) -> None:
    if not os.path.isfile(os.path.join(tree, "Makefile")):
        scratch = f"{tree}.unpack"
        shutil.rmtree(scratch, ignore_errors=True)
        os.makedirs(scratch)
        # tar(1): the tarball is Debian's, and xz through Python is several times slower
        unpack = ["tar", "-xf", source, "-C", scratch, "--strip-components=1"]
        if subprocess.run(unpack, check=False).returncode != 0:
            raise CorralError(f"cannot unpack {source}")
        os.replace(scratch, tree)
    fragment_path = os.path.join(tree, "corral.config")
    with open(fragment_path, "wb") as f:
        f.write(fragment)
    with open(log, "ab") as out:
        _make(tree, [f"KCONFIG_ALLCONFIG={fragment_path}", "allnoconfig"], jobs, out)
        _check_config(tree, fragment)
        _make(tree, ["vmlinux"], jobs, out)


def _check_config(tree: str, fragment: bytes) -> None:
    """allnoconfig silently drops an option whose dependencies are off: refuse that."""
    with open(os.path.join(tree, ".config")) as f:
        resolved = set(f.read().splitlines())
    wanted = [
        line
        for line in fragment.decode().splitlines()
        if line.startswith("CONFIG_") and line.endswith("=y")
    ]
    dropped = [line for line in wanted if line not in resolved]
    if dropped:
        raise CorralError(
            f"the kernel configuration lost options (unmet dependencies): {', '.join(dropped)}"
        )


def _make(tree: str, targets: list[str], jobs: int, log: IO[bytes]) -> None:
    done = subprocess.run(
        ["make", "-C", tree, f"-j{jobs}", *targets], stdout=log, stderr=subprocess.STDOUT
    )
    if done.returncode != 0:
        raise CorralError(
            f"make {' '.join(targets)} failed (exit {done.returncode}); see {log.name}"
        )


def _release(tree: str) -> str:
    done = subprocess.run(
        ["make", "-s", "-C", tree, "kernelrelease"], capture_output=True, text=True, check=False
    )
    return done.stdout.strip()


def _build_key(source: str, fragment: bytes) -> str:
    st = os.stat(source)
    text = f"{os.path.basename(source)}|{st.st_size}|{int(st.st_mtime)}|".encode() + fragment
    return hashlib.sha256(text).hexdigest()[:16]


def _version_key(path: str) -> tuple[int, ...]:
    version = os.path.basename(path).removeprefix("linux-source-").removesuffix(".tar.xz")
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def main(argv: Sequence[str] | None = None) -> int:
    from corral.backends.microvm.image import DEFAULT_CACHE_DIR

    parser = argparse.ArgumentParser(
        prog="python -m corral.backends.microvm.kernel",
        description="The minimal micro-VM guest kernel (built from Debian's kernel source).",
    )
    sub = parser.add_subparsers(dest="action", required=True)
    add_build_arguments(sub.add_parser("build", help="build it (about 8 minutes on 2 cores)"))
    sub.add_parser("path", help="print the built kernel's path (exit 1 if not built)")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR)
    args = parser.parse_args(argv)
    if args.action == "path":
        path = built_kernel(args.cache_dir)
        print(path or "not built", file=sys.stdout if path else sys.stderr)
        return 0 if path else 1
    return run_build(args)


def add_build_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", help=f"kernel source tarball (default: newest {SOURCE_GLOB})")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--keep-tree", action="store_true", help="keep the build tree (faster rebuilds)"
    )


def run_build(args: argparse.Namespace) -> int:
    """The CLI action shared by `python -m ... build` and `corral vm build-kernel`."""
    from corral.backends.microvm.image import DEFAULT_CACHE_DIR

    cache_dir = getattr(args, "cache_dir", None) or DEFAULT_CACHE_DIR
    start = time.monotonic()
    try:
        path = build(cache_dir, source=args.source, jobs=args.jobs, keep_tree=args.keep_tree)
    except CorralError as exc:
        hint = f" ({exc.remediation})" if exc.remediation else ""
        print(f"corral: {exc.message}{hint}", file=sys.stderr)
        return 1
    print(f"minimal guest kernel {kernel_release(path)}: {path} ({time.monotonic() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
