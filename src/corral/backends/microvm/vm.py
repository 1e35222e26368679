"""A booted micro-VM that runs any number of workloads, one at a time.

``MicroVM.boot`` starts QEMU in its own mount and network namespaces (see ``stage``), waits
for the guest agent and has it mount the shared root; ``exec`` runs one command in the guest;
``shutdown`` kills QEMU and removes the run directory. QEMU also dies with the thread that
booted it (PR_SET_PDEATHSIG), and a later boot (or `corral gc`: ``sweep_stale``) sweeps run
directories left by a killed caller, with their cgroup.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from corral.backends.base import LaunchOptions
from corral.backends.microvm import limits, protocol, qemu, stage
from corral.backends.microvm.image import GuestImage
from corral.backends.microvm.limits import HostLimits
from corral.backends.microvm.process import Channel, GuestProcess
from corral.errors import BackendUnavailableError, CorralError
from corral.kernel.cgroups import Cgroup, PreparedCgroupJoin
from corral.kernel.privileges import PreparedPrivileges
from corral.plan import NetworkPlan
from corral.policy.filesystem import FilesystemPolicy

if TYPE_CHECKING:
    from corral.net import NetworkAttachment
    from corral.net.attachment import Audit

RUN_SUBDIR = "microvm"  # of Corral's run directory (the lifecycle's, $CORRAL_RUN_DIR)
RUN_DIR = os.path.join(os.environ.get("CORRAL_RUN_DIR", "/run/corral"), RUN_SUBDIR)
_QEMU_PID = "qemu.pid"
# "<pid> <start> <QEMU's start>" of the process that booted the VM: QEMU outliving it is an orphan
_OWNER = "owner"
_CGROUP = "cgroup"  # the name of QEMU's cgroup, when it has one
_STALE_BOOT_S = 60  # a run directory without QEMU this old is a boot that died before QEMU ran


class MicroVM:
    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        agent: socket.socket,
        monitor: socket.socket,
        rundir: str,
        machine: qemu.Machine,
        view: stage.Stage,
        cgroup: Cgroup | None,
    ) -> None:
        self.machine = machine
        self.pid = proc.pid
        self.cgroup = cgroup
        self._proc = proc
        self._channel = Channel(agent)
        self._qmp = qemu.Qmp(monitor)
        self._rundir = rundir
        self._stage = view
        self._busy = threading.Lock()
        self._network: NetworkAttachment | None = None

    @classmethod
    def boot(
        cls,
        fs: FilesystemPolicy,
        machine: qemu.Machine,
        image: GuestImage,
        *,
        snapshot: str | None = None,
        boot_timeout: float = 60.0,
        network: NetworkPlan | None = None,
        audit: Audit | None = None,
        host_limits: HostLimits | None = None,
        cgroup_name: str | None = None,
    ) -> MicroVM:
        """Boot a guest that sees ``fs``; with ``snapshot`` (written by save() from an idle VM of
        the same image and machine), resume that guest instead of booting a kernel.
        ``network`` (mode rules or proxy; the machine must have a NIC): corral.net enforces it
        on QEMU's network namespace before the guest runs anything. ``host_limits``: QEMU runs
        in a cgroup with them, named ``cgroup_name`` (default: after the run directory)."""
        if (network is not None and network.mode != "none") != machine.nic:
            raise CorralError("a micro-VM has a NIC exactly when its plan has network rules")
        vm = cls._start(
            fs, machine, image, incoming=snapshot, host_limits=host_limits, cgroup_name=cgroup_name
        )
        try:
            if network is not None and network.mode != "none":
                from corral import net

                vm._network = net.attach(network, pid=vm.pid, audit=audit)
            if snapshot is None:
                vm._await_agent(boot_timeout)
            else:
                vm._await_resume(boot_timeout)
            vm._mount()
        except BaseException:
            vm.shutdown()
            raise
        return vm

    @classmethod
    def boot_idle(
        cls, machine: qemu.Machine, image: GuestImage, *, boot_timeout: float = 60.0
    ) -> MicroVM:
        """A booted guest that has mounted nothing yet: the template save() snapshots."""
        vm = cls._start(FilesystemPolicy((), ()), machine, image, incoming=None)
        try:
            vm._await_agent(boot_timeout)
        except BaseException:
            vm.shutdown()
            raise
        return vm

    @classmethod
    def _start(
        cls,
        fs: FilesystemPolicy,
        machine: qemu.Machine,
        image: GuestImage,
        *,
        incoming: str | None,
        host_limits: HostLimits | None = None,
        cgroup_name: str | None = None,
    ) -> MicroVM:
        os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
        sweep_stale(RUN_DIR)
        rundir = tempfile.mkdtemp(prefix="vm-", dir=RUN_DIR)
        view = stage.plan_stage(fs, rundir)
        os.mkdir(view.root)
        os.mkdir(view.covers)
        cgroup, join = None, None
        if host_limits is not None:
            name = cgroup_name or os.path.basename(rundir)
            _write_file(f"{rundir}/{_CGROUP}", name)  # before it exists: a sweep finds it
            try:
                cgroup = limits.create(name, host_limits)
                join = cgroup.prepare_join()
            except BaseException:
                if cgroup is not None:
                    cgroup.remove()
                shutil.rmtree(rundir, ignore_errors=True)
                raise
        agent, agent_peer = socket.socketpair()
        monitor, monitor_peer = socket.socketpair()
        argv = qemu.argv(image, machine, view.root, f"{rundir}/console.log")
        if incoming is not None:
            argv += ["-incoming", f"exec:cat {_shell_quote(incoming)}"]
        privileges = stage.qemu_privileges()
        parent = os.getpid()
        parent_start = _start_time(parent)
        log = open(f"{rundir}/qemu.log", "wb")  # noqa: SIM115 - handed to the child, closed below
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # Not pass_fds=(3, 4): those numbers need not be open in this process (a
                # thread's socket may hold one, or none), which fails the spawn with EBADF.
                close_fds=False,
                preexec_fn=lambda: _child_setup(
                    view, privileges, parent, agent_peer.fileno(), monitor_peer.fileno(), join
                ),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            agent.close()
            monitor.close()
            if cgroup is not None:
                cgroup.remove()
            shutil.rmtree(rundir, ignore_errors=True)
            raise BackendUnavailableError(
                f"cannot start {qemu.QEMU}: {exc}", remediation="apt-get install qemu-system-x86"
            ) from exc
        finally:
            log.close()
            agent_peer.close()
            monitor_peer.close()
            if join is not None:
                join.close()
        _write_file(f"{rundir}/{_QEMU_PID}", str(proc.pid))
        # last: a run directory without it is a boot in progress to a concurrent sweep
        _write_file(f"{rundir}/{_OWNER}", f"{parent} {parent_start} {_start_time(proc.pid)}")
        return cls(proc, agent, monitor, rundir, machine, view, cgroup)

    def exec(
        self,
        argv: Sequence[str],
        *,
        cwd: str,
        env: Mapping[str, str],
        timeout_ms: int = 0,
        options: LaunchOptions | None = None,
        stdio: tuple[int, int, int] | None = None,
        terminal: int | None = None,
        wait_s: float = 0.0,
    ) -> GuestProcess:
        """Run ``argv`` in the guest; the previous process must be closed first (within
        ``wait_s`` seconds). ``stdio``: the workload's stdin, stdout and stderr descriptors,
        or ``terminal``: the slave of a host pty (taken over), instead of ``options``' modes
        (``options.pty``: a terminal in the guest, the host side of it as ``pty_fd``)."""
        options = options or LaunchOptions()
        env = self._with_proxy(env)
        free = self._busy.acquire(timeout=wait_s) if wait_s > 0 else self._busy.acquire(False)
        if not free:
            raise CorralError("this micro-VM is already running a workload; close it first")
        try:
            return GuestProcess(
                self._channel,
                protocol.exec_payload(cwd, argv, env),
                pid=self.pid,
                timeout_ms=timeout_ms,
                options=options,
                on_close=self._busy.release,
                hard_kill=self.shutdown,
                stdio=stdio,
                terminal=terminal,
            )
        except BaseException:
            self._busy.release()
            raise

    def save(self, path: str) -> None:
        """Write the VM's state to ``path`` (QEMU migration to a file); the VM stays paused.
        Only an idle VM (boot_idle) can be saved: QEMU refuses while 9p is mounted."""
        self._qmp.command("stop")
        self._qmp.command("migrate", uri=f"exec:cat > {_shell_quote(path)}")
        while (status := self._qmp.command("query-migrate").get("status")) not in (
            "completed",
            "failed",
        ):
            time.sleep(0.01)
        if status != "completed":
            raise CorralError(f"saving the micro-VM failed: {self._console_tail()}")

    def wait(self) -> int:
        """Block until QEMU exits (the VM died or was shut down); its exit status."""
        return self._proc.wait()

    def shutdown(self) -> None:
        """Kill QEMU and remove every file of this VM, and its cgroup (idempotent)."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
        self._proc.wait()
        if self._network is not None:
            self._network.close()
        self._channel.close()
        self._qmp.close()
        if self.cgroup is not None:
            self.cgroup.remove()
        shutil.rmtree(self._rundir, ignore_errors=True)

    def _with_proxy(self, env: Mapping[str, str]) -> Mapping[str, str]:
        """As the process backend does: the proxy variables the plan set name the proxy as
        the guest reaches it (through 10.0.2.2)."""
        inside = self._network.proxy_url_inside if self._network is not None else None
        if inside is None:
            return env
        return {
            k: inside if k.lower().endswith("_proxy") and k.lower() != "no_proxy" else v
            for k, v in env.items()
        }

    def _await_agent(self, timeout: float) -> None:
        try:
            kind, _ = self._channel.receive(timeout)
        except (TimeoutError, protocol.AgentGone) as exc:
            raise CorralError(
                f"the micro-VM did not start (accel={self.machine.accel}, {type(exc).__name__}); "
                f"console: {self._console_tail()}"
            ) from exc
        if kind != protocol.READY:
            raise CorralError(f"unexpected first message from the guest agent: {kind!r}")

    def _await_resume(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (status := self._qmp.command("query-status")["status"]) != "running":
            if status == "paused":  # loaded; the saved guest was stopped
                self._qmp.command("cont")
            elif status != "inmigrate" or time.monotonic() > deadline:
                raise CorralError(
                    f"the micro-VM did not resume from its snapshot (state {status}): {self._console_tail()}"
                )
            else:
                time.sleep(0.005)

    def _mount(self) -> None:
        self._channel.send(protocol.ENTROPY, os.urandom(64))
        payload = protocol.mount_payload(qemu.NINEP_OPTIONS, self._stage.guest_tmpfs)
        self._channel.send(protocol.MOUNT, payload)
        kind, payload = self._channel.receive(30.0)
        if kind != protocol.MOUNTED:
            raise CorralError(
                f"the guest could not mount the shared root: {payload.decode(errors='replace')}"
            )

    def _console_tail(self) -> str:
        texts = []
        for name in ("qemu.log", "console.log"):
            try:
                with open(f"{self._rundir}/{name}", "rb") as f:
                    texts.append(f.read()[-1500:].decode(errors="replace").strip())
            except OSError:
                pass
        return " | ".join(t for t in texts if t) or "(empty)"


def _child_setup(
    plan: stage.Stage,
    privileges: PreparedPrivileges,
    parent: int,
    agent_fd: int,
    monitor_fd: int,
    join: PreparedCgroupJoin | None,
) -> None:
    if join is not None:
        join.apply()  # before QEMU allocates anything: all of its memory is charged there
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (agent_fd, monitor_fd)]
    os.dup2(high[0], qemu.AGENT_FD)
    os.dup2(high[1], qemu.QMP_FD)
    os.closerange(qemu.QMP_FD + 1, os.sysconf("SC_OPEN_MAX"))  # QEMU inherits 0-4 only
    stage.enter(plan, privileges, parent)


def sweep_stale(run_dir: str) -> list[str]:
    """Remove run directories whose QEMU is gone (a caller killed before its cleanup ran) and
    kill a QEMU that outlived the process that booted it; each with its cgroup. Returns the
    run directories removed."""
    removed = []
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        if not name.startswith("vm-") or not os.path.isdir(path):
            continue
        owner = _read_ints(f"{path}/{_OWNER}")
        if len(owner) != 3:
            if time.time() - os.stat(path).st_mtime < _STALE_BOOT_S:
                continue  # a boot in progress
        elif _alive(owner[0], owner[1]) and _is_qemu(_qemu_pid(path), owner[2]):
            continue
        else:
            _kill_qemu(_qemu_pid(path), owner[2])
        cgroup = _read_text(f"{path}/{_CGROUP}")
        if cgroup:
            limits.remove_named(cgroup)
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _kill_qemu(pid: int, start: int) -> None:
    """SIGKILL an orphaned QEMU (not our child: wait until it is gone or a zombie)."""
    if not _is_qemu(pid, start):
        return
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while _is_qemu(pid, start) and time.monotonic() < deadline:
        time.sleep(0.01)


def _qemu_pid(rundir: str) -> int:
    pid = _read_ints(f"{rundir}/{_QEMU_PID}")
    return pid[0] if pid else 0


def _stat_fields(pid: int) -> tuple[str, list[str]] | None:
    """(comm, the fields after it) of a process in /proc, None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            comm, _, rest = f.read().rpartition(") ")
    except OSError:
        return None
    return comm.partition("(")[2], rest.split()


def _start_time(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[1][19]) if fields else 0


def _alive(pid: int, start: int) -> bool:
    """A live (not zombie: this host's PID 1 may never reap orphans) process started at ``start``."""
    fields = _stat_fields(pid)
    return fields is not None and fields[1][0] not in "ZX" and int(fields[1][19]) == start


def _is_qemu(pid: int, start: int) -> bool:
    fields = _stat_fields(pid)
    return _alive(pid, start) and fields is not None and fields[0].startswith("qemu-system-x86")


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _read_ints(path: str) -> list[int]:
    try:
        return [int(v) for v in _read_text(path).split()]
    except ValueError:
        return []


def _write_file(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _shell_quote(path: str) -> str:
    return "'" + path.replace("'", "'\\''") + "'"
