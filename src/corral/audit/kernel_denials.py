"""The kernel's own denials for the audit trail: Landlock and seccomp refusals of one sandbox.

A :class:`KernelDenialWatcher` subscribes to kernel audit records before the sandbox starts
(:meth:`~KernelDenialWatcher.open`), learns the sandbox from its supervisor's pid
(:meth:`~KernelDenialWatcher.attach`), and after the workload ends (:meth:`~KernelDenialWatcher.finish`)
writes one ``fs_denial``, ``seccomp_denial``, ``network_decision`` or ``ipc_denial`` event per
distinct denial, with the kernel's time, the denied process's host pid and the request's actor.

Attribution. The kernel's records name the denied process by host pid (seccomp in its own
record, Landlock in the event's SYSCALL record, the Landlock domain's creator in its
``allocated`` record). A record is the sandbox's when:

- the sandbox has its own audit session (the launcher wrote ``/proc/self/loginuid``, which
  gives every descendant a fresh ``ses`` that only CAP_AUDIT_CONTROL can change): its ``ses``
  is the sandbox's. Exact, and independent of whether the process still exists;
- otherwise, when one of those pids (or the denied process's parent) is, as the record is
  read, a live process in the sandbox's PID namespace; and every later record of a Landlock
  domain seen to be the sandbox's. A short-lived process that exited before its record was
  read, whose parent is gone too, cannot be attributed and is left out.

Kernel auditing is host-wide. Corral never turns it off, never touches an audit daemon's
settings, and turns it on only when root asks (``CORRAL_KERNEL_AUDIT=enable``); when records
cannot be read the run still happens and the trail says once, as a ``kernel_audit`` event,
why denials are missing.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from corral.audit.events import AuditEvent, EventType, utc_time
from corral.audit.recorder import Recorder
from corral.kernel import audit_netlink as netlink
from corral.kernel.audit_netlink import AuditRecord

ENV_KERNEL_AUDIT = "CORRAL_KERNEL_AUDIT"  # "enable": root lets Corral turn kernel audit on
MAX_DISTINCT_DENIALS = 1000  # per sandbox; further ones are counted, not itemised
_BARRIER_TIMEOUT_S = 2.0
_POLL_S = 0.05
_UNSET_SESSION = 4294967295

# Landlock rights (as the kernel names them in ``blockers``) -> the trail's ``access`` verbs.
_FS_ACCESS = {
    "fs.read_file": "read",
    "fs.read_dir": "read",
    "fs.execute": "execute",
    "fs.write_file": "write",
    "fs.truncate": "write",
    "fs.ioctl_dev": "ioctl",
    "fs.remove_dir": "delete",
    "fs.remove_file": "delete",
    "fs.refer": "rename",
    "fs.change_topology": "mount",
}
# seccomp actions the kernel logs that refuse the call (RET_LOG and RET_ALLOW let it run).
_SECCOMP_ACTIONS = {
    0x80000000: "kill_process",
    0x00000000: "kill_thread",
    0x00030000: "trap",
    0x00050000: "errno",
    0x7FC00000: "user_notif",
    0x7FF00000: "trace",
}
_SECCOMP_ACTION_MASK = 0xFFFF0000


@dataclass(frozen=True)
class Denial:
    """One refusal as the trail records it."""

    type: EventType
    pid: int | None
    reason: str
    data: dict[str, Any]
    time: float  # the kernel's clock, seconds since the epoch

    def key(self) -> str:
        """Identical refusals (same process, same thing) are one event with a count."""
        return json.dumps([self.type, self.pid, self.data], sort_keys=True)


@dataclass(frozen=True)
class KernelEvent:
    """The denial records of one kernel audit event (one serial) and who made them."""

    records: tuple[AuditRecord, ...]

    def _first(self, type_: int) -> AuditRecord | None:
        return next((r for r in self.records if r.type == type_), None)

    @property
    def subject(self) -> AuditRecord | None:
        """The record naming the denied process: seccomp's own, else the SYSCALL record."""
        return self._first(netlink.AUDIT_SECCOMP) or self._first(netlink.AUDIT_SYSCALL)

    @property
    def session(self) -> int | None:
        subject = self.subject
        return subject.number("ses") if subject is not None else None

    @property
    def domain(self) -> str | None:
        access = self._first(netlink.AUDIT_LANDLOCK_ACCESS)
        return access.fields.get("domain") if access is not None else None

    def pids(self) -> list[int]:
        """Host pids that place the event: the process, its parent, the domain's creator."""
        subject, domain = self.subject, self._first(netlink.AUDIT_LANDLOCK_DOMAIN)
        found = [subject.number("pid"), subject.number("ppid")] if subject is not None else []
        if domain is not None:
            found.append(domain.number("pid"))
        return [pid for pid in found if pid]

    def denials(self) -> list[Denial]:
        out: list[Denial] = []
        for record in self.records:
            if record.type == netlink.AUDIT_LANDLOCK_ACCESS:
                out.append(_landlock_denial(record, self.subject))
            elif record.type == netlink.AUDIT_SECCOMP:
                denial = _seccomp_denial(record)
                if denial is not None:
                    out.append(denial)
        return out


def _landlock_denial(record: AuditRecord, subject: AuditRecord | None) -> Denial:
    fields = record.fields
    blockers = fields.get("blockers", "").split(",")
    pid = subject.number("pid") if subject is not None else None
    common: dict[str, Any] = {"mechanism": "landlock", "blockers": blockers}
    common["domain"] = fields.get("domain")
    if subject is not None and "exe" in subject.fields:
        common["exe"] = subject.fields["exe"]
    first = blockers[0]
    if first.startswith("net."):
        port = fields.get("dest") or fields.get("src")
        data = {**common, "protocol": "tcp", "ip": fields.get("daddr") or fields.get("saddr")}
        data["port"] = int(port) if port and port.isdigit() else port
        verb = "connect to" if first == "net.connect_tcp" else "bind"
        reason = f"Landlock refused to {verb} TCP port {data['port']}"
        return Denial("network_decision", pid, reason, data, record.time)
    if first.startswith("scope."):
        scope = first.removeprefix("scope.")
        data = {**common, "scope": scope}
        for key in ("path", "opid", "ocomm"):
            if key in fields:
                data[key] = fields[key]
        target = fields.get("path") or fields.get("ocomm") or fields.get("opid") or "?"
        reason = f"Landlock refused {scope.replace('_', ' ')} access to {target}"
        return Denial("ipc_denial", pid, reason, data, record.time)
    path = fields.get("path") or fields.get("name") or "?"
    access = _FS_ACCESS.get(first, first.removeprefix("fs."))
    data = {**common, "path": path, "access": access}
    rights = ", ".join(b.removeprefix("fs.") for b in blockers)
    return Denial("fs_denial", pid, f"Landlock refused {rights} on {path}", data, record.time)


def _seccomp_denial(record: AuditRecord) -> Denial | None:
    code = int(record.fields.get("code", "0"), 16)
    action = _SECCOMP_ACTIONS.get(code & _SECCOMP_ACTION_MASK)
    number, arch = record.number("syscall"), record.fields.get("arch", "")
    if action is None or number is None:
        return None
    name = syscall_name(int(arch, 16) if arch else 0, number)
    data: dict[str, Any] = {"mechanism": "seccomp", "syscall": name, "number": number}
    data.update(arch=arch, action=action)
    if "exe" in record.fields:
        data["exe"] = record.fields["exe"]
    reason = f"seccomp refused {name} ({action})"
    return Denial("seccomp_denial", record.number("pid"), reason, data, record.time)


def syscall_name(arch: int, number: int) -> str:
    """``unshare`` for (AUDIT_ARCH_X86_64, 272); ``syscall 999`` when libseccomp does not know."""
    import pyseccomp  # loaded only when a seccomp denial is seen: its import runs ldconfig

    try:
        name: bytes = pyseccomp.resolve_syscall(arch, number)
    except ValueError:
        return f"syscall {number}"
    return name.decode()


@dataclass
class SandboxScope:
    """Which processes are one sandbox's, as far as audit records can tell."""

    pid_ns: tuple[int, int] | None
    session: int | None
    domains: set[str] = field(default_factory=set)

    @classmethod
    def of_supervisor(cls, pid: int) -> SandboxScope:
        """The sandbox whose outer supervisor is ``pid``: the PID namespace its children get,
        and its audit session when the launcher gave it one of its own."""
        pid_ns = _namespace(f"/proc/{pid}/ns/pid_for_children")
        if pid_ns == _namespace("/proc/self/ns/pid"):
            pid_ns = None  # not (yet) a namespace of its own: it would match the whole host
        session = _session_of(pid)
        if session == _session_of(os.getpid()):
            session = None  # inherited from the caller: it would match the caller's processes
        return cls(pid_ns, session)

    def owns(self, event: KernelEvent) -> bool:
        if self.session is not None:
            mine = event.session == self.session
        else:
            mine = event.domain in self.domains or any(map(self._in_namespace, event.pids()))
        if mine and event.domain is not None:
            self.domains.add(event.domain)
        return mine

    def _in_namespace(self, pid: int) -> bool:
        found = _namespace(f"/proc/{pid}/ns/pid")  # None: exited (or never ours to see)
        return found is not None and found == self.pid_ns


def _namespace(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _session_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/sessionid") as f:
            session = int(f.read())
    except (OSError, ValueError):
        return None
    return None if session == _UNSET_SESSION else session


@dataclass(frozen=True)
class _Note:
    """A ``kernel_audit`` event: the state of the watch itself."""

    available: bool
    reason: str
    data: dict[str, Any] = field(default_factory=dict)


class KernelDenialWatcher:
    """Collects one sandbox's kernel denial records. Never raises for a missing mechanism:
    auditing denials is evidence, not enforcement; what is missing becomes a note."""

    def __init__(self, reader: netlink.RecordReader | None, notes: list[_Note]) -> None:
        self._reader = reader
        self._notes = notes
        self._lock = threading.Lock()
        self._scope: SandboxScope | None = None
        self._early: list[KernelEvent] = []  # completed before attach
        self._pending: dict[int, list[AuditRecord]] = {}  # Landlock events awaiting their end
        self._found: dict[str, tuple[Denial, int]] = {}
        self._overflow = 0
        self._token = secrets.token_hex(8)
        self._barrier = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if reader is not None:
            self._thread = threading.Thread(target=self._loop, name="corral-kernel-denials")
            self._thread.daemon = True
            self._thread.start()

    @classmethod
    def open(cls, *, enabled: bool = True, enable_audit: bool | None = None) -> KernelDenialWatcher:
        """Subscribe before the sandbox starts (a watcher that does nothing when not
        ``enabled``, i.e. audit is off). ``enable_audit`` (default: the environment's
        ``CORRAL_KERNEL_AUDIT=enable``) lets Corral turn kernel audit on when it is off and
        no audit daemon is registered."""
        if not enabled:
            return cls(None, [])
        if enable_audit is None:
            enable_audit = os.environ.get(ENV_KERNEL_AUDIT) == "enable"
        notes: list[_Note] = []
        try:
            status: netlink.AuditStatus | None = netlink.get_status()
        except OSError:
            status = None  # without CAP_AUDIT_CONTROL: reading may still work
        if status is not None and status.enabled == 0:
            problem = _why_not_enabled(status, enable_audit)
            if problem is not None:
                return cls(None, [_Note(False, problem, {"enabled": 0})])
            try:
                netlink.set_enabled(True)
            except OSError as exc:
                return cls(None, [_Note(False, f"could not turn kernel audit on: {exc}")])
            reason = f"Corral turned kernel audit on host-wide ({ENV_KERNEL_AUDIT}=enable)"
            notes.append(_Note(True, reason, {"enabled": 1, "changed": True}))
        try:
            reader = netlink.RecordReader()
        except OSError as exc:
            reason = "kernel audit records are unreadable: " + (
                "reading them needs CAP_AUDIT_READ (run as root)"
                if exc.errno == errno.EPERM
                else str(exc)
            )
            return cls(None, [*notes, _Note(False, reason)])
        return cls(reader, notes)

    @property
    def listening(self) -> bool:
        """Whether denial records are being read (ask the launcher for them only then)."""
        return self._reader is not None

    def attach(self, supervisor_pid: int) -> None:
        """Name the sandbox: its outer supervisor's pid, right after launch."""
        scope = SandboxScope.of_supervisor(supervisor_pid)
        with self._lock:
            self._scope = scope
            early, self._early = self._early, []
            for event in early:
                self._attribute(event)

    def finish(self, recorder: Recorder) -> None:
        """After the workload has ended: wait for its last records, then write the events."""
        if self._reader is not None:
            self._drain()
        for note in self._notes:
            recorder.emit("kernel_audit", reason=note.reason, available=note.available,
                          **note.data)  # fmt: skip
        for denial, count in self._found.values():
            data = {**denial.data, "count": count} if count > 1 else denial.data
            recorder.sink.append(
                AuditEvent(
                    denial.type,
                    recorder.actor,
                    sandbox=recorder.sandbox,
                    pid=denial.pid,
                    decision="deny",
                    reason=denial.reason,
                    data=data,
                    time=utc_time(denial.time),
                )
            )
        self._found.clear()
        self._notes.clear()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._reader is not None:
            self._reader.close()

    def __enter__(self) -> KernelDenialWatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _drain(self) -> None:
        """Queue a barrier behind the sandbox's records and read up to it."""
        assert self._reader is not None and self._thread is not None
        try:
            netlink.send_user_message(f"corral-denials-barrier={self._token}")
            complete = self._barrier.wait(_BARRIER_TIMEOUT_S)
        except OSError:  # no CAP_AUDIT_WRITE: fall back to a short quiet period
            complete = False
            self._stop.wait(_BARRIER_TIMEOUT_S / 4)
        self._stop.set()
        self._thread.join()
        with self._lock:
            for records in self._pending.values():
                self._complete(records)
            self._pending.clear()
        if not complete:
            reason = "kernel audit records were read until a timeout, not a barrier"
            self._notes.append(_Note(True, reason, {"complete": False}))
        self._note_losses()

    def _note_losses(self) -> None:
        assert self._reader is not None
        if self._reader.lost:
            reason = "Corral's reader overflowed: some kernel denial records were lost"
            self._notes.append(_Note(True, reason, {"overruns": self._reader.lost}))
        if self._overflow:
            reason = f"more than {MAX_DISTINCT_DENIALS} distinct kernel denials; the rest counted"
            self._notes.append(_Note(True, reason, {"notItemised": self._overflow}))

    def _loop(self) -> None:
        assert self._reader is not None
        while not self._stop.is_set():
            for record in self._reader.read(_POLL_S):
                if record.type == netlink.AUDIT_TRUSTED_APP and self._token in record.fields.get(
                    "msg", ""
                ):
                    self._barrier.set()
                    return
                with self._lock:
                    self._take(record)

    def _take(self, record: AuditRecord) -> None:
        """Group records by event: seccomp's is whole; Landlock's ends with the event."""
        if record.type == netlink.AUDIT_SECCOMP:
            self._complete([record])
        elif record.type == netlink.AUDIT_LANDLOCK_ACCESS:
            self._pending.setdefault(record.serial, []).append(record)
        elif record.serial in self._pending:
            if record.type == netlink.AUDIT_EOE:
                self._complete(self._pending.pop(record.serial))
            elif record.type in (netlink.AUDIT_SYSCALL, netlink.AUDIT_LANDLOCK_DOMAIN):
                self._pending[record.serial].append(record)

    def _complete(self, records: Sequence[AuditRecord]) -> None:
        event = KernelEvent(tuple(records))
        if self._scope is None:
            self._early.append(event)
        else:
            self._attribute(event)

    def _attribute(self, event: KernelEvent) -> None:
        assert self._scope is not None
        if not self._scope.owns(event):
            return
        for denial in event.denials():
            key = denial.key()
            if key in self._found:
                first, count = self._found[key]
                self._found[key] = (first, count + 1)
            elif len(self._found) < MAX_DISTINCT_DENIALS:
                self._found[key] = (denial, 1)
            else:
                self._overflow += 1


def _why_not_enabled(status: netlink.AuditStatus, enable_audit: bool) -> str | None:
    """Why kernel audit, off, stays off; None when Corral may turn it on."""
    if status.daemon_pid:
        return (
            f"kernel audit is off and an audit daemon (pid {status.daemon_pid}) is registered; "
            "Corral leaves its settings alone (enable it with `auditctl -e 1`)"
        )
    if not enable_audit:
        return (
            "kernel audit is off, so Landlock and seccomp denials are not recorded; enable it "
            f"(`auditctl -e 1`) or let Corral do so as root with {ENV_KERNEL_AUDIT}=enable"
        )
    return None
