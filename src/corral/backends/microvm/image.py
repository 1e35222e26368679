"""The guest image: the kernel that scripts/fetch-guest-kernel.sh caches, and the initramfs
Corral builds on demand (busybox-static, the guest agent compiled with ``gcc -static``, the
kernel modules the guest needs, and ``init``), cached under a content hash."""

from __future__ import annotations

import hashlib
import lzma
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import resources

from corral.errors import BackendUnavailableError

DEFAULT_GUEST_DIR = os.environ.get("CORRAL_GUEST_DIR", "/opt/corral/guest")
DEFAULT_CACHE_DIR = os.environ.get("CORRAL_CACHE_DIR", "/var/cache/corral") + "/microvm"
BUSYBOX = "/bin/busybox"
_XZ_MAGIC = b"\xfd7zXZ\x00"
FETCH_HINT = "run scripts/fetch-guest-kernel.sh (Debian's kernel package, unpacked into a cache)"


@dataclass(frozen=True)
class GuestImage:
    kernel: str
    initramfs: str
    kernel_version: str


def guest_image(
    guest_dir: str = DEFAULT_GUEST_DIR,
    cache_dir: str = DEFAULT_CACHE_DIR,
    *,
    prefer_minimal: bool = True,
) -> GuestImage:
    """The kernel and a (cached) initramfs; raises BackendUnavailableError naming what is missing.
    The minimal kernel of `corral vm build-kernel` (no modules) wins when it has been built."""
    from corral.backends.microvm import kernel as minimal_kernel  # lazy: also run as __main__

    minimal = minimal_kernel.built_kernel(cache_dir) if prefer_minimal else None
    if minimal is not None:
        return minimal_guest(minimal, cache_dir)
    kernel_path = os.path.join(guest_dir, "vmlinuz")
    modules = os.path.join(guest_dir, "modules")
    if not os.path.isfile(kernel_path) or not os.path.isfile(os.path.join(modules, "order")):
        raise BackendUnavailableError(
            f"no micro-VM guest kernel in {guest_dir}", remediation=FETCH_HINT
        )
    with open(os.path.join(modules, "version")) as f:
        version = f.read().strip()
    return GuestImage(
        _uncompressed(kernel_path, cache_dir), _initramfs(modules, cache_dir), version
    )


def minimal_guest(vmlinux: str, cache_dir: str) -> GuestImage:
    """The guest around the kernel of `corral vm build-kernel` (everything built in)."""
    from corral.backends.microvm import kernel as minimal_kernel

    release = minimal_kernel.kernel_release(vmlinux)
    return GuestImage(vmlinux, _initramfs(None, cache_dir), release)


def _uncompressed(kernel: str, cache_dir: str) -> str:
    """The kernel as an uncompressed ELF (QEMU boots it through its PVH entry point): under
    software emulation, decompressing the bzImage at every boot costs seconds."""
    with open(kernel, "rb") as f:
        packed = f.read()
    target = os.path.join(cache_dir, f"vmlinux-{hashlib.sha256(packed).hexdigest()[:16]}")
    if os.path.exists(target):
        return target
    start = packed.find(_XZ_MAGIC)
    if start < 0:
        return kernel  # not an xz-compressed bzImage: QEMU decompresses it at boot
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(packed[start:])
    if not elf.startswith(b"\x7fELF"):
        return kernel
    os.makedirs(cache_dir, mode=0o755, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".vmlinux-")
    with os.fdopen(fd, "wb") as out:
        out.write(elf)
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)
    return target


def _initramfs(modules: str | None, cache_dir: str) -> str:
    """``modules``: the directory of the modules to load at boot, None for a kernel without."""
    loaded: dict[str, bytes] = {}
    if modules is not None:
        with open(os.path.join(modules, "order")) as f:
            for name in f.read().split():
                with open(os.path.join(modules, name), "rb") as module:
                    loaded[name] = module.read()
    order = list(loaded)
    guest = resources.files("corral.backends.microvm") / "guest"
    sources = {
        "init": guest.joinpath("init").read_bytes(),
        "agent.c": guest.joinpath("agent.c").read_bytes(),
        "busybox": _read_static_busybox(),
        "modules/order": "\n".join(order).encode() + b"\n",
    }
    sources.update({"modules/" + name: data for name, data in loaded.items()})
    digest = hashlib.sha256()
    for name in sorted(sources):
        digest.update(name.encode() + b"\0" + hashlib.sha256(sources[name]).digest())
    target = os.path.join(cache_dir, f"initramfs-{digest.hexdigest()[:16]}.cpio")
    if os.path.exists(target):
        return target
    os.makedirs(cache_dir, mode=0o755, exist_ok=True)
    archive = _Cpio()
    for d in ("bin", "dev", "modules", "newroot", "proc", "sys"):
        archive.directory(d)
    archive.char_device("dev/console", 5, 1)
    archive.file("init", sources["init"], 0o755)
    archive.file("bin/busybox", sources["busybox"], 0o755)
    archive.file("agent", _compile_agent(sources["agent.c"]), 0o755)
    archive.file("modules/order", sources["modules/order"], 0o644)
    for name in order:
        archive.file("modules/" + name, sources["modules/" + name], 0o644)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".initramfs-")
    with os.fdopen(fd, "wb") as out:
        out.write(archive.finish())
    os.chmod(tmp, 0o644)
    os.replace(tmp, target)  # atomic: concurrent builders produce the same bytes
    return target


def _read_static_busybox() -> bytes:
    try:
        with open(BUSYBOX, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise BackendUnavailableError(
            f"{BUSYBOX} is missing ({exc.strerror})", remediation="apt-get install busybox-static"
        ) from exc
    if b"/lib64/ld-linux" in data[:8192]:  # a dynamic busybox has an ELF interpreter
        raise BackendUnavailableError(
            f"{BUSYBOX} is dynamically linked", remediation="apt-get install busybox-static"
        )
    return data


def _compile_agent(source: bytes) -> bytes:
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BackendUnavailableError(
            "building the micro-VM guest agent needs gcc",
            remediation="apt-get install gcc libc6-dev",
        )
    with tempfile.TemporaryDirectory(prefix="corral-agent-") as tmp:
        src, out = os.path.join(tmp, "agent.c"), os.path.join(tmp, "agent")
        with open(src, "wb") as f:
            f.write(source)
        done = subprocess.run(
            [gcc, "-static", "-Os", "-s", "-o", out, src],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise BackendUnavailableError(
                f"compiling the guest agent failed: {done.stderr.strip()[-500:]}",
                remediation="apt-get install gcc libc6-dev (static libc is needed)",
            )
        with open(out, "rb") as f:
            return f.read()


class _Cpio:
    """A minimal writer of the "newc" cpio format the kernel unpacks as initramfs."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755, b"")

    def file(self, name: str, data: bytes, mode: int) -> None:
        self._entry(name, 0o100000 | mode, data)

    def char_device(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"")
        return b"".join(self._parts)

    def _entry(self, name: str, mode: int, data: bytes, rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._ino += 1
        header = b"070701" + b"".join(b"%08x" % v for v in fields)
        self._parts += [header, encoded, _pad(len(header) + len(encoded)), data, _pad(len(data))]


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)
