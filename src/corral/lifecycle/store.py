"""Sandbox state on disk: one 0700 directory per sandbox under the owner's run directory.

    /run/corral/                 mode 1733 (anyone may add their own uid directory; no listing)
    /run/corral/service.sock     the local service (`corral serve`), mode 0666, peer-credential checked
    /run/corral/<uid>/           mode 0700, owned by <uid>
    /run/corral/<uid>/<token>/   state.json (0600, atomic replace), lock, control.sock, exec.log

The base moves with ``$CORRAL_RUN_DIR`` (tests). A fixed, uid-derived layout lets root (the
service, `corral gc`) find every user's sandboxes without trusting anyone's environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from corral.errors import CorralError, ErrorCode, LifecycleError
from corral.lifecycle.ids import token_of

Phase = Literal["provisioned", "started", "stopped", "deprovisioning"]
DEFAULT_RUN_DIR = "/run/corral"
STATE_FILE = "state.json"
CONTROL_SOCKET = "control.sock"
EXEC_LOG = "exec.log"
SERVICE_SOCKET = "service.sock"


@dataclass
class SandboxState:
    id: str
    containment: str
    owner_uid: int
    owner_gid: int
    request: dict[str, Any]  # the validated provision request, re-planned at every start
    phase: Phase = "provisioned"
    created: float = field(default_factory=time.time)
    supervisor_pid: int | None = None
    supervisor_start: int | None = None  # start time in clock ticks: survives pid reuse
    cgroup: str | None = None
    netns: str | None = None
    workspace: str | None = None
    # isolation_session: MXC's provision metadata (agentUserName, agentUserSid,
    # ephemeralWorkspacePath). Informational: root trusts only its own binding (session.py).
    session: dict[str, Any] | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)


def run_dir() -> str:
    return os.environ.get("CORRAL_RUN_DIR", DEFAULT_RUN_DIR)


def service_socket() -> str:
    return os.path.join(run_dir(), SERVICE_SOCKET)


def user_dir(uid: int, *, create: bool = True) -> str:
    """The run directory of ``uid``, created (and checked: owned by uid, 0700, no symlink)."""
    base = run_dir()
    path = os.path.join(base, str(uid))
    if create:
        _ensure_base(base)
        try:
            os.mkdir(path, 0o700)
            if os.geteuid() != uid:
                os.chown(path, uid, -1)
        except FileExistsError:
            pass
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return path
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid or st.st_mode & 0o077:
        raise CorralError(
            f"{path} is not a private directory owned by uid {uid}; refusing to use it",
            code=ErrorCode.BACKEND_ERROR,
            remediation="remove it (as root: `corral gc`) and try again",
        )
    return path


def _ensure_base(base: str) -> None:
    if os.path.isdir(base):
        return
    if os.geteuid() != 0:
        raise CorralError(
            f"the Corral run directory {base} does not exist",
            code=ErrorCode.BACKEND_UNAVAILABLE,
            remediation=f"as root: `mkdir -m 1733 {base}` (or run `corral gc` once as root)",
        )
    os.makedirs(base, exist_ok=True)
    os.chmod(base, 0o1733)


def sandbox_dir(sandbox_id: str, uid: int) -> str:
    return os.path.join(user_dir(uid, create=False), token_of(sandbox_id))


def user_dirs() -> Iterator[tuple[int, str]]:
    """Every uid directory (root only can list the base)."""
    base = run_dir()
    with contextlib.suppress(FileNotFoundError, PermissionError):
        for name in os.listdir(base):
            if name.isdigit():
                yield int(name), os.path.join(base, name)


def find_sandbox(sandbox_id: str, caller_uid: int) -> str:
    """The directory of ``sandbox_id`` as ``caller_uid`` may see it; ``stale_id`` when there is
    none (also when it belongs to another user: their ids are not confirmed to exist)."""
    token = token_of(sandbox_id)
    candidates = (
        [path for _, path in user_dirs()]
        if caller_uid == 0
        else [user_dir(caller_uid, create=False)]
    )
    for base in candidates:
        path = os.path.join(base, token)
        if os.path.exists(os.path.join(path, STATE_FILE)):
            return path
    raise stale(sandbox_id)


def stale(sandbox_id: str) -> LifecycleError:
    return LifecycleError(
        f"sandbox {sandbox_id} does not exist (deprovisioned, or never provisioned here)",
        code=ErrorCode.STALE_ID,
        remediation="provision a new sandbox; `corral ps` lists yours",
    )


def load(path: str) -> SandboxState | None:
    """The state in ``path``, or None when missing or corrupt. The file is its owner's to
    write, so nothing in it decides whose it is: the owner is the uid of the directory (checked
    by :func:`user_dir`), the group is that user's own, and the id must match the directory."""
    try:
        with os.fdopen(_open_private(os.path.join(path, STATE_FILE), os.O_RDONLY)) as f:
            state = SandboxState(**json.load(f))
        if token_of(state.id) != os.path.basename(path):
            return None
        state.owner_uid = os.stat(os.path.dirname(path)).st_uid
    except (OSError, ValueError, TypeError, LifecycleError):
        return None
    state.owner_gid = primary_gid(state.owner_uid)
    return state


def primary_gid(uid: int) -> int:
    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return uid


def save(path: str, state: SandboxState) -> None:
    """Atomic: write a temporary file, fsync, rename over the old state."""
    tmp = os.path.join(path, f".{STATE_FILE}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    if os.geteuid() != state.owner_uid:  # root writing for a user: the file stays theirs
        os.fchown(fd, state.owner_uid, state.owner_gid)
    with os.fdopen(fd, "w") as f:
        f.write(state.to_json())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, STATE_FILE))


def create(state: SandboxState) -> str:
    path = os.path.join(user_dir(state.owner_uid), token_of(state.id))
    os.mkdir(path, 0o700)
    if os.geteuid() != state.owner_uid:  # root provisioning for a user (isolation_session)
        os.lchown(path, state.owner_uid, state.owner_gid)
    save(path, state)
    return path


@contextlib.contextmanager
def locked(path: str) -> Iterator[None]:
    """Exclusive per-sandbox lock (released by the kernel if the holder dies)."""
    lock = os.path.join(path, "lock")
    try:
        try:
            fd = os.open(
                lock, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            owner = os.stat(path).st_uid
            if os.geteuid() != owner:  # root created it for a user: theirs to use next time
                os.fchown(fd, owner, -1)
        except FileExistsError:
            fd = _open_private(lock, os.O_RDWR)
    except (FileNotFoundError, NotADirectoryError):
        yield  # removed meanwhile: the caller's reload finds no state
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _open_private(path: str, flags: int) -> int:
    """Open a file of a (possibly hostile) user's sandbox directory as root would: no symlink,
    no FIFO or device to block on, a regular file only."""
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path} is not a regular file")
    return fd


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat, or None when the process is gone (or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def supervisor_alive(state: SandboxState) -> bool:
    pid, start = state.supervisor_pid, state.supervisor_start
    return pid is not None and start is not None and process_start_time(pid) == start
