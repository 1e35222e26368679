"""`microvm` and `vm` sandboxes in the lifecycle: start boots the VM (from the idle snapshot)
in a detached *owner* process that keeps it running and serves the sandbox's control socket.

    caller ──spawn──► owner "corral-sup" (python -m corral.lifecycle.microvm; own session,
                      │  outlives the caller; killing it stops the sandbox)
                      └─► QEMU (dies with the owner: PR_SET_PDEATHSIG), slirp4netns when the
                          plan has network rules

The owner is named like a process sandbox's supervisor and holds the control socket the same
way, so stop, deprovision, `corral ps` and `corral gc` treat both alike; exec speaks the same
protocol (backends/microvm/serve.py). What a killed owner leaves (QEMU's run directory, an
orphaned QEMU, its cgroup) is swept by :func:`collect` (`corral gc`) and by the next boot.
The backend builds QEMU's view with mounts, so these sandboxes need root.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from corral.errors import CorralError, ErrorCode
from corral.lifecycle import store
from corral.lifecycle.ids import PREFIXES
from corral.lifecycle.launch import SUPERVISOR_NAME, Started, kill_supervisor
from corral.lifecycle.privsep import unwrap

CONTAINMENTS = ("microvm", "vm")
OWNER_LOG = "vm.log"  # the owner's own output, in the sandbox's directory
# A first start may build the initramfs and boot once to save the idle snapshot (seconds under
# TCG; minutes on a loaded machine): the snapshot is then reused by every later start.
START_TIMEOUT_S = 300.0
_PR_SET_NAME = 15


def is_vm(sandbox_id: object) -> bool:
    return isinstance(sandbox_id, str) and sandbox_id.startswith(
        tuple(PREFIXES[c] + ":" for c in CONTAINMENTS)
    )


def start(path: str) -> Started:
    """Spawn the owner of the sandbox at ``path``; wait until its VM runs and serves the
    control socket. The owner plans the stored request itself (the caller validated it)."""
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(path, store.CONTROL_SOCKET))
    try:
        with open(os.path.join(path, OWNER_LOG), "ab") as log:
            owner = subprocess.Popen(
                [sys.executable, "-m", "corral.lifecycle.microvm", path, str(ready_w)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(ready_w,),
                start_new_session=True,  # outlives the caller and its terminal
            )  # fmt: skip
        os.close(ready_w)
        ready_w = -1
        report = _read_report(ready_r, START_TIMEOUT_S)
    finally:
        os.close(ready_r)
        if ready_w >= 0:
            os.close(ready_w)
    start_time = store.process_start_time(owner.pid)
    try:
        if not report:
            raise CorralError(
                f"the micro-VM owner exited during start: {_log_tail(path)}",
                code=ErrorCode.BACKEND_ERROR,
            )
        result = unwrap(json.loads(report))
        if start_time is None:
            raise CorralError("the micro-VM owner exited after start", code=ErrorCode.BACKEND_ERROR)
    except BaseException:
        kill_supervisor(owner.pid)
        raise
    return Started(owner.pid, start_time, result.get("cgroup"))


def collect() -> list[str]:
    """`corral gc`: QEMU run directories whose owner is gone, and any QEMU that outlived it."""
    from corral.backends.microvm.vm import RUN_SUBDIR, sweep_stale

    # where the owners' backend puts them (at its import, from the same $CORRAL_RUN_DIR)
    vm_runs = os.path.join(store.run_dir(), RUN_SUBDIR)
    if os.geteuid() != 0 or not os.path.isdir(vm_runs):
        return []
    return sweep_stale(vm_runs)


def _read_report(fd: int, timeout: float) -> bytes:
    """Everything the owner writes to its ready pipe (it closes it once the VM runs)."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    while select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
    raise CorralError(
        f"the micro-VM did not start within {timeout:.0f} s", code=ErrorCode.BACKEND_ERROR
    )


def _log_tail(path: str) -> str:
    try:
        with open(os.path.join(path, OWNER_LOG), "rb") as f:
            return f.read()[-1500:].decode(errors="replace").strip() or "(no output)"
    except OSError:
        return "(no log)"


# --- the owner process ---------------------------------------------------------------------


def _own(path: str, ready_fd: int) -> None:
    """Boot the sandbox's VM, report on ``ready_fd``, then serve execs until the VM ends."""
    from corral import api
    from corral.backends.microvm import MicrovmBackend
    from corral.backends.microvm.serve import serve
    from corral.lifecycle import manager, trail
    from corral.lifecycle.launch import plan_sandbox

    ctypes.CDLL(None).prctl(_PR_SET_NAME, SUPERVISOR_NAME.encode(), 0, 0, 0)
    try:
        state = store.load(path)
        if state is None:
            raise CorralError(f"no sandbox state in {path}", code=ErrorCode.STALE_ID)
        # the experimental gate was passed at provision
        plan = plan_sandbox(api.parse(state.request, experimental=True))
        token = os.path.basename(path)
        listener = _listen(path)
        # Network decisions (the rules' audit events) go to the sandbox's trail.
        audit = trail.of_state(state).network_decision
        vm = MicrovmBackend().boot(plan, audit, cgroup_name=manager.cgroup_name(token))
    except Exception as exc:  # reported to the starting caller, which raises it
        error = exc if isinstance(exc, CorralError) else CorralError(f"{type(exc).__name__}: {exc}")
        os.write(ready_fd, error.to_json().encode())
        os._exit(1)

    def end(*_: object) -> None:
        vm.shutdown()
        os._exit(0)

    signal.signal(signal.SIGTERM, end)

    # QEMU ending (killed by stop, or crashed) ends the owner, which cleans up after it.
    def watch() -> None:
        vm.wait()
        end()

    threading.Thread(target=watch, daemon=True).start()
    cgroup = vm.cgroup.name if vm.cgroup is not None else None
    os.write(ready_fd, json.dumps({"result": {"cgroup": cgroup}}).encode())
    os.close(ready_fd)
    serve(vm, listener)


def _listen(path: str) -> socket.socket:
    """The control socket, 0600 at its real path (`corral gc` finds owners by it)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o177)
    try:
        listener.bind(os.path.join(path, store.CONTROL_SOCKET))
    finally:
        os.umask(old_umask)
    listener.listen(64)
    return listener


def _main(argv: list[str]) -> Any:
    if len(argv) != 2:
        return "usage: python -m corral.lifecycle.microvm SANDBOX_DIR READY_FD"
    _own(argv[0], int(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
