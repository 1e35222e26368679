"""Micro-VM start-up and exec latency, side by side with a process sandbox measured in the same run.

Figures: cold boot-to-command (kernel boot, one `true`) with Debian's generic kernel and, when
`corral vm build-kernel` has built it, the minimal kernel; restore-to-command (resume the idle
snapshot, mount the plan's view, one `true`), exec latency in a running VM (the backend's
`vm.exec`; a path that does not exist, which measures Corral's round trip to the guest agent
alone; and through the lifecycle: `run_in_container` on a started `microvm` sandbox, caller to
owner process to agent and back), lifecycle start (owner process + restore), and the baseline:
`corral.run` with the process backend when it works here, else bubblewrap.
Usage: python bench/microvm.py [--rounds N] [--skip-cold]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

from corral.backends.base import LaunchOptions
from corral.backends.microvm import MicrovmBackend
from corral.backends.microvm.image import DEFAULT_CACHE_DIR
from corral.backends.microvm.kernel import built_kernel
from corral.contract.model import ProcessSpec, Request
from corral.plan import Plan, build_plan

QUIET = LaunchOptions(stdin="devnull", stdout="devnull", stderr="devnull")


def timed(action: Callable[[], object], rounds: int) -> list[float]:
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        action()
        samples.append(time.perf_counter() - start)
    return samples


def one_shot(backend: MicrovmBackend, plan: Plan) -> None:
    with backend.launch(plan, QUIET) as proc:
        if proc.wait(120) != 0:
            raise SystemExit("the micro-VM command failed")


def lifecycle(rounds: int) -> tuple[list[float], list[float], list[float]]:
    """Start of a `microvm` sandbox (owner process, restore, mount), warm exec in it, and the
    round trip alone: caller, control socket, owner, agent (a path that does not exist, sent
    without the `/bin/sh -c` of a lifecycle exec)."""
    os.environ["CORRAL_RUN_DIR"] = tempfile.mkdtemp(prefix="corral-bench-") + "/corral"
    os.environ["CORRAL_NO_SERVICE"] = "1"
    from corral.lifecycle import api, store
    from corral.lifecycle.client import start_exec

    provision = {"version": "1.1.0-alpha", "phase": "provision", "containment": "microvm"}
    sid = api.provision_container(provision, experimental=True).container_id
    try:
        start = timed(lambda: (api.start_container(sid), api.stop_container(sid)), rounds)
        api.start_container(sid)

        def exec_true() -> None:
            if api.run_in_container(sid, "/bin/true").exit_code != 0:
                raise SystemExit("the lifecycle exec failed")

        path = store.find_sandbox(sid, os.getuid())

        def exec_missing() -> None:
            with start_exec(
                os.path.join(path, store.CONTROL_SOCKET), command=("/nonexistent",),
                env={}, cwd="/", timeout_ms=0, stdin_devnull=True,
            ) as proc:  # fmt: skip
                proc.communicate()

        exec_true()
        return start, timed(exec_true, rounds * 10), timed(exec_missing, rounds * 10)
    finally:
        api.deprovision_container(sid)


def baseline() -> tuple[str, Callable[[], object]]:
    try:
        from corral.api import run

        request = {"version": "1.0.0", "process": {"commandLine": "true"}}
        run(request)
        return "corral.run (process backend)", lambda: run(request)
    except Exception as exc:  # any failure: the process backend is not usable in this checkout
        print(
            f"(process backend unusable here: {type(exc).__name__}: {exc}; baseline is bubblewrap)"
        )
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise SystemExit(
            "no baseline: neither corral.run nor bwrap works (apt-get install bubblewrap)"
        )
    argv = [
        bwrap,
        "--ro-bind",
        "/usr",
        "/usr",
        "--symlink",
        "usr/bin",
        "/bin",
        "--symlink",
        "usr/lib",
        "/lib",
    ]
    argv += [
        "--symlink",
        "usr/lib64",
        "/lib64",
        "--proc",
        "/proc",
        "--dev",
        "/dev",
        "--unshare-all",
    ]
    argv += ["--die-with-parent", "/bin/sh", "-c", "true"]
    return "bubblewrap 0.8 (all namespaces)", lambda: subprocess.run(argv, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-cold", action="store_true", help="skip the cold boots")
    args = parser.parse_args()

    cold_generic = MicrovmBackend(fast_start=False, minimal_kernel=False)
    warm_backend = MicrovmBackend()
    info = warm_backend.probe()
    if not info.available:
        raise SystemExit(f"micro-VM backend unavailable: {info.reason}")
    request = Request(version="1.1.0-alpha", containment="microvm", process=ProcessSpec("true"))
    plan = build_plan(request, info)
    accelerator = warm_backend.accelerator()
    print(f"accelerator: {accelerator.name} ({accelerator.detail})")

    cold: list[float] = []
    if not args.skip_cold:
        cold = timed(lambda: one_shot(cold_generic, plan), args.rounds)
    cold_minimal: list[float] = []
    if args.skip_cold:
        pass
    elif built_kernel(DEFAULT_CACHE_DIR) is not None:
        cold_backend = MicrovmBackend(fast_start=False)
        cold_minimal = timed(lambda: one_shot(cold_backend, plan), args.rounds)
    else:
        print("(minimal kernel not built: `corral vm build-kernel`; its cold boot is not measured)")
    one_shot(warm_backend, plan)  # creates the snapshot when missing (one boot, not measured)
    restore = timed(lambda: one_shot(warm_backend, plan), args.rounds)
    restore_generic: list[float] = []
    if built_kernel(DEFAULT_CACHE_DIR) is not None:  # else the row above is Debian's kernel
        generic = MicrovmBackend(minimal_kernel=False)
        one_shot(generic, plan)
        restore_generic = timed(lambda: one_shot(generic, plan), args.rounds)
    vm = warm_backend.boot(plan)
    try:

        def exec_true() -> None:
            with vm.exec(["/bin/true"], cwd="/", env={}, options=QUIET) as proc:
                proc.wait(60)

        def exec_missing() -> None:
            with vm.exec(["/nonexistent"], cwd="/", env={}, options=QUIET) as proc:
                proc.wait(60)

        exec_true()  # first exec loads the binary into the guest's cache
        warm = timed(exec_true, args.rounds * 10)
        round_trip = timed(exec_missing, args.rounds * 10)
    finally:
        vm.shutdown()
    start, lifecycle_exec, lifecycle_trip = lifecycle(args.rounds)
    name, action = baseline()
    action()
    base = timed(action, args.rounds * 10)

    base_ms = statistics.median(base) * 1000
    rows = [
        ("cold boot-to-command, Debian generic kernel", cold, ""),
        ("cold boot-to-command, minimal kernel", cold_minimal, "1.5 s (TCG); 150 ms (KVM)"),
        ("restore-to-command", restore, "0.5 s"),
        ("restore-to-command, Debian generic kernel", restore_generic, "0.5 s"),
        ("exec of /bin/true in a running VM", warm, "20 ms"),
        ("exec of a missing path (round trip only)", round_trip, ""),
        ("lifecycle start + stop (owner, restore)", start, ""),
        ("lifecycle warm exec of /bin/true", lifecycle_exec, "20 ms"),
        ("lifecycle exec of a missing path (round trip)", lifecycle_trip, ""),
        (f"baseline: {name}", base, ""),
    ]
    print(f"{'measure':<44} {'median':>10} {'min':>10} {'x baseline':>11}  target")
    for label, samples, target in rows:
        if not samples:
            continue
        median, low = statistics.median(samples) * 1000, min(samples) * 1000
        print(f"{label:<44} {median:>8.1f}ms {low:>8.1f}ms {median / base_ms:>10.1f}x  {target}")


if __name__ == "__main__":
    main()
