"""Resource limits through cgroups: v2 first, v1 fallback, aware of hybrid hosts.

A sandbox gets one group per hierarchy that carries one of its limits, all named
``<prefix>/<name>``: on a pure v2 host one directory under the cgroup2 mount; on a v1 or hybrid
host one under each v1 controller's mount, plus a tracking group in the cgroup2 (or v1 freezer)
hierarchy so the whole process tree can be ended at once. Limits that cannot be set raise a
:class:`~corral.errors.PolicyError` naming the controller and how to get it: never run with less.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Literal

from corral.errors import CorralError, ErrorCode, PolicyError

Mode = Literal["v2", "v1", "hybrid", "none"]
LIMITED_CONTROLLERS = ("memory", "pids", "cpu")
DEFAULT_PREFIX = "corral"
_CPU_PERIOD_US = 100_000
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_DELEGATION_HINT = (
    "run as root, or delegate a subtree: create {parent} and chown it and its cgroup.procs "
    "(and, on cgroup v2, cgroup.subtree_control) to this user"
)


@dataclass(frozen=True)
class Placement:
    """Where a controller lives: its hierarchy's version and mount, and whether we can write."""

    controller: str
    version: Literal[1, 2]
    mount: str
    writable: bool


@dataclass(frozen=True)
class CgroupHost:
    """The host's cgroup layout as seen by this process."""

    mode: Mode
    unified: str | None
    has_kill: bool
    controllers: Mapping[str, Placement]
    freezer: str | None = None
    cgroup2_supported: bool = True

    def tracking_mount(self) -> str | None:
        """The hierarchy that tracks a whole sandbox tree for killing it."""
        return self.unified or self.freezer

    def describe(self) -> str:
        lines = [f"cgroups: {self.mode}"]
        if self.unified:
            kill = "with cgroup.kill" if self.has_kill else "without cgroup.kill"
            lines.append(f"  cgroup2 at {self.unified} ({kill})")
        for name in LIMITED_CONTROLLERS:
            placement = self.controllers.get(name)
            if placement is None:
                lines.append(f"  {name}: unavailable")
            else:
                access = "writable" if placement.writable else "not writable by this user"
                lines.append(f"  {name}: v{placement.version} at {placement.mount} ({access})")
        if self.mode == "none" and self.cgroup2_supported:
            lines.append("  hint: mount -t cgroup2 none /sys/fs/cgroup")
        return "\n".join(lines)


def _unescape(field_text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_text)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _writable(mount: str, prefix: str) -> bool:
    parent = os.path.join(mount, prefix)
    return os.access(parent if os.path.isdir(parent) else mount, os.W_OK)


def detect(*, mountinfo: str = "/proc/self/mountinfo", prefix: str = DEFAULT_PREFIX) -> CgroupHost:
    """Read the mount table to find each hierarchy and which limits this uid can set."""
    unified: str | None = None
    v1: dict[str, str] = {}
    for line in _read(mountinfo).splitlines():
        before, _, after = line.partition(" - ")
        mount_fields, fs_fields = before.split(), after.split()
        if len(mount_fields) < 5 or len(fs_fields) < 3:
            continue
        mountpoint = _unescape(mount_fields[4])
        if fs_fields[0] == "cgroup2" and unified is None:
            unified = mountpoint
        elif fs_fields[0] == "cgroup":
            for option in fs_fields[2].split(","):
                v1.setdefault(option, mountpoint)
    v2_controllers: set[str] = set()
    has_kill = False
    if unified is not None:
        with contextlib.suppress(OSError):
            v2_controllers = set(_read(os.path.join(unified, "cgroup.controllers")).split())
        has_kill = _has_kill(unified, prefix)
    placements: dict[str, Placement] = {}
    for name in LIMITED_CONTROLLERS:
        if name in v2_controllers and unified is not None:
            placements[name] = Placement(name, 2, unified, _writable(unified, prefix))
        elif name in v1:
            placements[name] = Placement(name, 1, v1[name], _writable(v1[name], prefix))
    has_v1 = any(p.version == 1 for p in placements.values()) or "freezer" in v1
    mode: Mode = (
        ("hybrid" if has_v1 else "v2") if unified is not None else ("v1" if has_v1 else "none")
    )
    supported = "cgroup2" in _read("/proc/filesystems")
    return CgroupHost(mode, unified, has_kill, placements, v1.get("freezer"), supported)


def _has_kill(unified: str, prefix: str) -> bool:
    """cgroup.kill (Linux 5.14) exists in every non-root group; look at one we can see."""
    own = "/"
    with contextlib.suppress(OSError):
        for line in _read("/proc/self/cgroup").splitlines():
            if line.startswith("0::"):
                own = line[3:]
    candidates = [os.path.join(unified, prefix), os.path.join(unified, own.lstrip("/"))]
    return any(os.path.exists(os.path.join(c, "cgroup.kill")) for c in candidates)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _pids_in(directory: str) -> set[int]:
    try:
        return {int(line) for line in _read(os.path.join(directory, "cgroup.procs")).split()}
    except FileNotFoundError:
        return set()


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for its parent does not)."""
    try:
        stat = _read(f"/proc/{pid}/stat")
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _live_pids(directories: Iterable[str]) -> set[int]:
    return {pid for d in directories for pid in _pids_in(d) if _alive(pid)}


def _counter(path: str, key: str) -> int:
    try:
        for line in _read(path).splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except FileNotFoundError:
        pass
    return 0


def _kill_tree(directories: list[str], *, timeout: float) -> None:
    """End every process in ``directories``: cgroup.kill where it exists, else freeze and
    SIGKILL until nothing is left (the freeze stops a fork bomb from outrunning the loop)."""
    deadline = time.monotonic() + timeout
    kill_files = [os.path.join(d, "cgroup.kill") for d in directories]
    for kill_file in kill_files:
        if os.path.exists(kill_file):
            _write(kill_file, "1")
    while True:
        remaining = _live_pids(directories)
        if not remaining:
            return
        if time.monotonic() > deadline:
            raise CorralError(
                f"processes {sorted(remaining)} survived SIGKILL in {directories}",
                code=ErrorCode.BACKEND_ERROR,
            )
        with _frozen(directories):
            for pid in _live_pids(directories):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)


@contextlib.contextmanager
def _frozen(directories: list[str]) -> Iterator[None]:
    switches = []
    for d in directories:
        for file, on, off in (("cgroup.freeze", "1", "0"), ("freezer.state", "FROZEN", "THAWED")):
            path = os.path.join(d, file)
            if os.path.exists(path):
                with contextlib.suppress(OSError):
                    _write(path, on)
                    switches.append((path, off))
    try:
        yield None
    finally:
        for path, off in switches:
            with contextlib.suppress(OSError):
                _write(path, off)


def _remove_directories(directories: list[str], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for directory in directories:
        while True:
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    raise CorralError(
                        f"cannot remove cgroup {directory}: {exc.strerror}",
                        code=ErrorCode.BACKEND_ERROR,
                    ) from exc
                time.sleep(0.01)


@dataclass
class PreparedCgroupJoin:
    """``cgroup.procs`` files opened in the parent; :meth:`apply` moves the calling child in."""

    fds: list[int]

    def apply(self) -> None:
        for fd in self.fds:
            os.write(fd, b"0")  # "0" means the writing process itself

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


@dataclass
class Cgroup:
    """One sandbox's groups: ``directories`` maps each role (a controller, or ``tracking``) to
    its directory; several roles share one directory on cgroup v2."""

    name: str
    directories: dict[str, str]
    _removed: bool = field(default=False, repr=False)

    def paths(self) -> list[str]:
        return list(dict.fromkeys(self.directories.values()))

    def procs_files(self) -> list[str]:
        """Every ``cgroup.procs`` a member must be in; a child joins by writing ``0`` to each."""
        return [os.path.join(d, "cgroup.procs") for d in self.paths()]

    def prepare_join(self) -> PreparedCgroupJoin:
        """Open the ``cgroup.procs`` files before fork, for the child to join itself."""
        fds: list[int] = []
        try:
            for path in self.procs_files():
                fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
        except OSError:
            PreparedCgroupJoin(fds).close()
            raise
        return PreparedCgroupJoin(fds)

    def add(self, pid: int) -> None:
        for path in self.procs_files():
            _write(path, str(pid))

    def pids(self) -> set[int]:
        return _live_pids(self.paths())

    def kill_all(self, *, timeout: float = 5.0) -> None:
        _kill_tree(self.paths(), timeout=timeout)

    def oom_killed(self) -> bool:
        memory = self.directories.get("memory")
        if memory is None:
            return False
        for events in ("memory.events", "memory.oom_control"):
            if os.path.exists(os.path.join(memory, events)):
                return _counter(os.path.join(memory, events), "oom_kill") > 0
        return int(_read(os.path.join(memory, "memory.failcnt")) or 0) > 0

    def pids_exhausted(self) -> bool:
        pids = self.directories.get("pids")
        return pids is not None and _counter(os.path.join(pids, "pids.events"), "max") > 0

    def remove(self, *, timeout: float = 5.0) -> None:
        """Kill every member and delete the groups; safe to call again or after they vanished."""
        if self._removed:
            return
        existing = [d for d in self.paths() if os.path.isdir(d)]
        _kill_tree(existing, timeout=timeout)
        _remove_directories(existing, timeout=timeout)
        self._removed = True


def _refuse(controller: str, what: str, host: CgroupHost, remediation: str) -> PolicyError:
    return PolicyError(
        f"cannot enforce the {what} limit: {controller}",
        remediation=remediation,
        details={"mechanism": "cgroup", "cgroups": host.mode},
    )


def _check_limit(label: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise PolicyError(f"{label} must be a positive integer, got {value!r}")


def _swap_enabled() -> bool:
    try:
        return len(_read("/proc/swaps").splitlines()) > 1
    except OSError:
        return False


def _limit_files(
    controller: str, version: int, memory_mb: int | None, pids: int | None, cpu_percent: int | None
) -> list[tuple[str, str, bool]]:
    """(file, value, required) in write order; optional files are only the swap caps."""
    if controller == "memory" and memory_mb is not None:
        limit = str(memory_mb * 1024 * 1024)
        if version == 2:
            return [("memory.max", limit, True), ("memory.swap.max", "0", False)]
        return [
            ("memory.limit_in_bytes", limit, True),
            ("memory.memsw.limit_in_bytes", limit, False),
        ]
    if controller == "pids" and pids is not None:
        return [("pids.max", str(pids), True)]
    if controller == "cpu" and cpu_percent is not None:
        quota = cpu_percent * _CPU_PERIOD_US // 100
        if version == 2:
            return [("cpu.max", f"{quota} {_CPU_PERIOD_US}", True)]
        return [
            ("cpu.cfs_period_us", str(_CPU_PERIOD_US), True),
            ("cpu.cfs_quota_us", str(quota), True),
        ]
    return []


def create(
    name: str,
    *,
    memory_mb: int | None,
    pids: int | None,
    cpu_percent: int | None,
    host: CgroupHost | None = None,
    prefix: str = DEFAULT_PREFIX,
) -> Cgroup:
    """Create the groups for sandbox ``name`` with the requested limits (None: no limit).

    ``cpu_percent`` is a share of one CPU (200 = two CPUs). Raises PolicyError when a limit
    cannot be set, CorralError(backend_error) when the group already exists.
    """
    if not _NAME.fullmatch(name):
        raise PolicyError(f"cgroup name {name!r} must be 1-64 letters, digits, '_', '.' or '-'")
    for label, value in (("memory_mb", memory_mb), ("pids", pids), ("cpu_percent", cpu_percent)):
        _check_limit(label, value)
    host = host or detect(prefix=prefix)
    wanted = {"memory": memory_mb, "pids": pids, "cpu": cpu_percent}
    labels = {"memory": "memory", "pids": "process count", "cpu": "CPU"}
    roles: dict[str, tuple[Placement | None, str]] = {}
    for controller, value in wanted.items():
        if value is None:
            continue
        placement = host.controllers.get(controller)
        if placement is None:
            raise _refuse(
                f"this host has no usable {controller} cgroup controller ({host.mode} cgroups)",
                labels[controller],
                host,
                f"enable the {controller} controller (cgroup_enable={controller} on the kernel "
                "command line, or mount its hierarchy)",
            )
        if not placement.writable:
            parent = os.path.join(placement.mount, prefix)
            raise _refuse(
                f"the {controller} controller at {placement.mount} is not writable for uid "
                f"{os.geteuid()}",
                labels[controller],
                host,
                _DELEGATION_HINT.format(parent=parent),
            )
        roles[controller] = (placement, placement.mount)
    tracking = host.tracking_mount()
    if tracking is not None and _writable(tracking, prefix):
        roles["tracking"] = (None, tracking)
    if not roles:
        raise _refuse(
            "no writable cgroup hierarchy to track the sandbox in",
            "process-tree",
            host,
            _DELEGATION_HINT.format(parent=f"/sys/fs/cgroup/{prefix}"),
        )
    cgroup = Cgroup(
        name, {role: os.path.join(mount, prefix, name) for role, (_, mount) in roles.items()}
    )
    created: list[str] = []
    try:
        _enable_v2_controllers(host, prefix, [c for c in wanted if c in roles])
        for directory in cgroup.paths():
            os.makedirs(os.path.dirname(directory), exist_ok=True)
            os.mkdir(directory)
            created.append(directory)
        for controller, (placement, _) in roles.items():
            if placement is None:
                continue
            directory = cgroup.directories[controller]
            for file, setting, required in _limit_files(
                controller, placement.version, memory_mb, pids, cpu_percent
            ):
                _set(directory, file, setting, required)
    except FileExistsError as exc:
        _remove_directories(created, timeout=1.0)
        raise CorralError(
            f"cgroup {exc.filename} already exists (a leftover of an earlier sandbox?)",
            code=ErrorCode.BACKEND_ERROR,
            remediation="remove it with corral.kernel.cgroups.remove_leftover",
        ) from exc
    except OSError as exc:
        _remove_directories(created, timeout=1.0)
        raise PolicyError(
            f"cannot set up cgroup {name!r}: {exc.strerror} ({exc.filename})",
            remediation=_DELEGATION_HINT.format(parent=os.path.dirname(cgroup.paths()[0])),
            details={"mechanism": "cgroup", "cgroups": host.mode},
        ) from exc
    except BaseException:
        _remove_directories(created, timeout=1.0)
        raise
    return cgroup


def _set(directory: str, file: str, value: str, required: bool) -> None:
    path = os.path.join(directory, file)
    if not required and not os.path.exists(path):
        if _swap_enabled():
            raise PolicyError(
                f"swap is enabled but {path} does not exist, so the memory limit could be "
                "escaped through swap",
                remediation="boot with swapaccount=1 (CONFIG_MEMCG_SWAP) or disable swap",
            )
        return
    _write(path, value)


def _enable_v2_controllers(host: CgroupHost, prefix: str, controllers: list[str]) -> None:
    """Turn on each v2 controller in ``subtree_control`` from the mount down to our parent."""
    if host.unified is None:
        return
    needed = [c for c in controllers if host.controllers[c].version == 2]
    if not needed:
        return
    os.makedirs(os.path.join(host.unified, prefix), exist_ok=True)
    for level in (host.unified, os.path.join(host.unified, prefix)):
        control = os.path.join(level, "cgroup.subtree_control")
        enabled = set(_read(control).split()) if os.path.exists(control) else set()
        missing = [c for c in needed if c not in enabled]
        if missing:
            _write(control, " ".join(f"+{c}" for c in missing))


def _leftover_parents(host: CgroupHost, prefix: str) -> list[str]:
    mounts = [p.mount for p in host.controllers.values()]
    tracking = host.tracking_mount()
    if tracking is not None:
        mounts.append(tracking)
    return [os.path.join(m, prefix) for m in dict.fromkeys(mounts)]


def list_leftovers(prefix: str = DEFAULT_PREFIX, *, host: CgroupHost | None = None) -> list[str]:
    """Every sandbox group under ``prefix`` in every hierarchy, for garbage collection."""
    host = host or detect(prefix=prefix)
    found = []
    for parent in _leftover_parents(host, prefix):
        with contextlib.suppress(FileNotFoundError):
            found += [e.path for e in os.scandir(parent) if e.is_dir(follow_symlinks=False)]
    return sorted(found)


def remove_leftover(
    path: str, *, prefix: str = DEFAULT_PREFIX, host: CgroupHost | None = None, timeout: float = 5.0
) -> None:
    """Kill whatever still runs in the leftover group ``path`` and delete it."""
    host = host or detect(prefix=prefix)
    if os.path.dirname(os.path.normpath(path)) not in _leftover_parents(host, prefix):
        raise CorralError(
            f"refusing to remove {path!r}: not a sandbox group under {prefix!r}",
            code=ErrorCode.POLICY_VALIDATION,
        )
    if os.path.isdir(path):
        _kill_tree([path], timeout=timeout)
        _remove_directories([path], timeout=timeout)
