"""A booted micro-VM that runs any number of workloads, one at a time.

``MicroVM.boot`` starts QEMU in its own mount and network namespaces (see ``stage``), waits
for the guest agent and has it mount the shared root; ``exec`` runs one command in the guest;
``shutdown`` kills QEMU and removes the run directory. QEMU also dies with the thread that
booted it (PR_SET_PDEATHSIG), and a later boot sweeps run directories left by a killed caller.
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
from corral.backends.microvm import protocol, qemu, stage
from corral.backends.microvm.image import GuestImage
from corral.backends.microvm.process import Channel, GuestProcess
from corral.errors import BackendUnavailableError, CorralError
from corral.kernel.privileges import PreparedPrivileges
from corral.plan import NetworkPlan
from corral.policy.filesystem import FilesystemPolicy

if TYPE_CHECKING:
    from corral.net import NetworkAttachment
    from corral.net.attachment import Audit

RUN_DIR = os.environ.get("CORRAL_RUN_DIR", "/run/corral") + "/microvm"
_OWNER = "qemu.pid"


class MicroVM:
    def __init__(
        self,
        proc: subprocess.Popen[bytes],
        agent: socket.socket,
        monitor: socket.socket,
        rundir: str,
        machine: qemu.Machine,
        view: stage.Stage,
    ) -> None:
        self.machine = machine
        self.pid = proc.pid
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
    ) -> MicroVM:
        """Boot a guest that sees ``fs``; with ``snapshot`` (written by save() from an idle VM of
        the same image and machine), resume that guest instead of booting a kernel.
        ``network`` (mode rules or proxy; the machine must have a NIC): corral.net enforces it
        on QEMU's network namespace before the guest runs anything."""
        if (network is not None and network.mode != "none") != machine.nic:
            raise CorralError("a micro-VM has a NIC exactly when its plan has network rules")
        vm = cls._start(fs, machine, image, incoming=snapshot)
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
        cls, fs: FilesystemPolicy, machine: qemu.Machine, image: GuestImage, *, incoming: str | None
    ) -> MicroVM:
        os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
        sweep_stale(RUN_DIR)
        rundir = tempfile.mkdtemp(prefix="vm-", dir=RUN_DIR)
        view = stage.plan_stage(fs, rundir)
        os.mkdir(view.root)
        os.mkdir(view.covers)
        agent, agent_peer = socket.socketpair()
        monitor, monitor_peer = socket.socketpair()
        argv = qemu.argv(image, machine, view.root, f"{rundir}/console.log")
        if incoming is not None:
            argv += ["-incoming", f"exec:cat {_shell_quote(incoming)}"]
        privileges = stage.qemu_privileges()
        parent = os.getpid()
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
                    view, privileges, parent, agent_peer.fileno(), monitor_peer.fileno()
                ),
            )
        except (OSError, subprocess.SubprocessError) as exc:
            agent.close()
            monitor.close()
            shutil.rmtree(rundir, ignore_errors=True)
            raise BackendUnavailableError(
                f"cannot start {qemu.QEMU}: {exc}", remediation="apt-get install qemu-system-x86"
            ) from exc
        finally:
            log.close()
            agent_peer.close()
            monitor_peer.close()
        with open(f"{rundir}/{_OWNER}", "w") as f:
            f.write(str(proc.pid))
        return cls(proc, agent, monitor, rundir, machine, view)

    def exec(
        self,
        argv: Sequence[str],
        *,
        cwd: str,
        env: Mapping[str, str],
        timeout_ms: int = 0,
        options: LaunchOptions | None = None,
    ) -> GuestProcess:
        """Run ``argv`` in the guest; the previous process must be closed first."""
        options = options or LaunchOptions()
        env = self._with_proxy(env)
        if options.pty is not None:
            raise BackendUnavailableError("the micro-VM agent does not offer a terminal (pty) yet")
        if not self._busy.acquire(blocking=False):
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

    def shutdown(self) -> None:
        """Kill QEMU and remove every file of this VM (idempotent)."""
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
        self._proc.wait()
        if self._network is not None:
            self._network.close()
        self._channel.close()
        self._qmp.close()
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
    plan: stage.Stage, privileges: PreparedPrivileges, parent: int, agent_fd: int, monitor_fd: int
) -> None:
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (agent_fd, monitor_fd)]
    os.dup2(high[0], qemu.AGENT_FD)
    os.dup2(high[1], qemu.QMP_FD)
    os.closerange(qemu.QMP_FD + 1, os.sysconf("SC_OPEN_MAX"))  # QEMU inherits 0-4 only
    stage.enter(plan, privileges, parent)


def sweep_stale(run_dir: str) -> None:
    """Remove run directories whose QEMU is gone (a caller killed before its cleanup ran)."""
    for name in os.listdir(run_dir):
        path = os.path.join(run_dir, name)
        try:
            with open(os.path.join(path, _OWNER)) as f:
                pid = int(f.read())
        except (OSError, ValueError):
            if time.time() - os.stat(path).st_mtime > 60:  # a boot that died before QEMU ran
                shutil.rmtree(path, ignore_errors=True)
            continue
        if not _is_qemu(pid):
            shutil.rmtree(path, ignore_errors=True)


def _is_qemu(pid: int) -> bool:
    """A live (not zombie: this host's PID 1 may never reap orphans) QEMU process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            comm, _, rest = f.read().partition(") ")
    except OSError:
        return False
    return comm.endswith("(qemu-system-x86") and not rest.startswith("Z")


def _shell_quote(path: str) -> str:
    return "'" + path.replace("'", "'\\''") + "'"
