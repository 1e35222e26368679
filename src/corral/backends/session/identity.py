"""Ephemeral agent identities: one host system account per session sandbox.

Each sandbox's workload runs under a uid/gid of its own, allocated from a reserved range above
the host's ordinary accounts (login.defs UID_MAX) and outside every subordinate-id range, so
files, processes, IPC objects and keyrings it creates carry an identity that is never the
human's. Release removes the account and everything that identity owned; identities that
survive a crash are listed for `corral gc` by :func:`list_leftover_identities`.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections.abc import Collection, Iterator
from dataclasses import dataclass

from corral.errors import BackendUnavailableError, CorralError, ErrorCode

NAME_PREFIX = "corral-agent-"
ID_RANGE = range(61000, 62000)
SESSIONS_ROOT = "/var/lib/corral/sessions"
_GRANTS_SUFFIX = ".grants"  # root-owned list of host paths given a POSIX ACL for this uid
_DISPLAY_SUFFIX = ".display"
_TOOL_TIMEOUT = 30.0


@dataclass(frozen=True)
class AgentIdentity:
    name: str
    uid: int
    gid: int
    workspace: str  # its home: the ephemeral workspace (0700, owned by the identity)

    @property
    def grants_file(self) -> str:
        return os.path.join(SESSIONS_ROOT, self.name + _GRANTS_SUFFIX)

    @property
    def display_dir(self) -> str:
        """Where its private display keeps socket and cookie (root-owned: not in the workspace)."""
        return display_dir_of(self.name)


def display_dir_of(name: str) -> str:
    return os.path.join(SESSIONS_ROOT, name + _DISPLAY_SUFFIX)


def require_root() -> None:
    if os.geteuid() != 0:
        raise BackendUnavailableError(
            "isolation_session creates a host account for each sandbox, which needs root",
            remediation="send the request through the Corral service (`corral serve`, run as "
            "root), which checks the caller's credentials and the admin policy",
        )


def allocate() -> AgentIdentity:
    """Create a fresh identity: group, account, and its 0700 workspace."""
    require_root()
    os.makedirs(SESSIONS_ROOT, mode=0o711, exist_ok=True)
    os.chmod(SESSIONS_ROOT, 0o711)  # identities traverse to their own home, list nothing
    for uid in _free_ids():
        name = f"{NAME_PREFIX}{uid}"
        workspace = os.path.join(SESSIONS_ROOT, name)
        if any(os.path.lexists(workspace + s) for s in ("", _GRANTS_SUFFIX, _DISPLAY_SUFFIX)):
            continue  # a half-released leftover: gc owns it
        if _run(["groupadd", "-g", str(uid), name]).returncode != 0:
            continue  # taken concurrently; try the next id
        made = _run(
            ["useradd", "-u", str(uid), "-g", str(uid), "-d", workspace, "-m",
             "-K", "HOME_MODE=0700", "-s", "/usr/sbin/nologin", "-l",
             "-c", "Corral ephemeral agent", name]
        )  # fmt: skip
        if made.returncode != 0:
            _run(["groupdel", name])
            continue
        os.chmod(workspace, 0o700)
        return AgentIdentity(name, uid, uid, workspace)
    raise CorralError(
        f"no free agent identity left in uids {ID_RANGE.start}-{ID_RANGE.stop - 1}",
        code=ErrorCode.BACKEND_UNAVAILABLE,
        remediation="deprovision idle session sandboxes or run `corral gc`",
    )


def lookup(name: str) -> AgentIdentity | None:
    """The identity called ``name`` if it is a Corral agent account that still exists."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    if not name.startswith(NAME_PREFIX) or entry.pw_uid not in ID_RANGE:
        return None
    return AgentIdentity(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir)


def list_leftover_identities(in_use: Collection[str] = ()) -> list[AgentIdentity]:
    """Agent accounts on this host whose names are not in ``in_use`` (for `corral gc`)."""
    found = [lookup(e.pw_name) for e in pwd.getpwall() if e.pw_name.startswith(NAME_PREFIX)]
    return [i for i in found if i is not None and i.name not in in_use]


def record_grant(identity: AgentIdentity, path: str) -> None:
    """Remember a host path that got an ACL for this uid, before adding it (crash-safe)."""
    fd = os.open(
        identity.grants_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600
    )
    with os.fdopen(fd, "a") as f:
        f.write(path + "\n")


def recorded_grants(identity: AgentIdentity) -> list[str]:
    try:
        with open(identity.grants_file) as f:
            return [line.rstrip("\n") for line in f if line.strip()]
    except FileNotFoundError:
        return []


def release(identity: AgentIdentity) -> None:
    """Remove the identity and everything it owned. Idempotent; safe after a crash."""
    require_root()
    from corral.backends.session import acl

    kill_processes_of(identity.uid)
    for path in recorded_grants(identity):
        acl.revoke(path, identity.uid)
        _hand_over(path, identity.uid)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(identity.grants_file)
    _remove_ipc_of(identity.uid)
    shutil.rmtree(identity.workspace, ignore_errors=True)
    shutil.rmtree(identity.display_dir, ignore_errors=True)
    if _account_exists(identity.name):
        _check(_run(["userdel", identity.name]), f"userdel {identity.name}")
    if _group_exists(identity.name):
        _check(_run(["groupdel", identity.name]), f"groupdel {identity.name}")


def kill_processes_of(uid: int, *, rounds: int = 50) -> None:
    """SIGKILL every process whose real, effective, saved or fs uid is ``uid``, in every PID
    namespace (the host's /proc shows them all), until none is left."""
    for _ in range(rounds):
        pids = list(_processes_of(uid))
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
    raise CorralError(f"processes of agent uid {uid} keep reappearing; not releasing it")


def _processes_of(uid: int) -> Iterator[int]:
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except (FileNotFoundError, ProcessLookupError):
            continue
        zombie = fields.get("State", "").strip().startswith("Z")  # only its parent can reap it
        if str(uid) in fields.get("Uid", "").split() and not zombie:
            yield int(entry)


def _remove_ipc_of(uid: int) -> None:
    """System V IPC objects in the host's IPC namespace (the sandbox's own vanish with it)."""
    for kind, flag in (("shm", "-m"), ("sem", "-s"), ("msg", "-q")):
        try:
            with open(f"/proc/sysvipc/{kind}") as f:
                header, *rows = [line.split() for line in f]
        except FileNotFoundError:
            continue
        uid_col, id_col = header.index("uid"), 1
        for row in rows:
            if row[uid_col] == str(uid):
                _run(["ipcrm", flag, row[id_col]])


def _hand_over(path: str, uid: int) -> None:
    """Files the agent created in a granted host path are the human's output: they pass to
    the owner of that path, so no later identity reusing the uid inherits them."""
    try:
        owner = os.lstat(path)
    except FileNotFoundError:
        return
    _run(["find", path, "-xdev", "-uid", str(uid), "-exec", "chown", "-h",
          f"{owner.st_uid}:{owner.st_gid}", "{}", "+"])  # fmt: skip


def _free_ids() -> Iterator[int]:
    reserved = _subordinate_ranges()
    for uid in ID_RANGE:
        if any(start <= uid < start + count for start, count in reserved):
            continue
        if _uid_taken(uid) or _gid_taken(uid):
            continue
        yield uid


def _subordinate_ranges() -> list[tuple[int, int]]:
    ranges: list[tuple[int, int]] = []
    for path in ("/etc/subuid", "/etc/subgid"):
        with contextlib.suppress(FileNotFoundError), open(path) as f:
            for line in f:
                parts = line.strip().split(":")
                if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                    ranges.append((int(parts[1]), int(parts[2])))
    return ranges


def _uid_taken(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def _gid_taken(gid: int) -> bool:
    try:
        grp.getgrgid(gid)
    except KeyError:
        return False
    return True


def _account_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _group_exists(name: str) -> bool:
    try:
        grp.getgrnam(name)
    except KeyError:
        return False
    return True


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=_TOOL_TIMEOUT)
    except FileNotFoundError as exc:
        raise BackendUnavailableError(
            f"{argv[0]} is missing: {exc}",
            remediation="install Debian's passwd and util-linux packages",
        ) from exc


def _check(done: subprocess.CompletedProcess[str], what: str) -> None:
    if done.returncode != 0:
        raise CorralError(f"{what} failed: {done.stderr.strip()}", code=ErrorCode.BACKEND_ERROR)
