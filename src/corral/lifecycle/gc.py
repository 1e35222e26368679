"""Crash clean-up: what a killed caller, service or supervisor may leave behind.

* a sandbox directory without readable state (crash during provision or deprovision), or in
  phase ``deprovisioning``: removed with everything it still holds;
* a ``started`` sandbox whose supervisor is dead: its cgroup and socket are released and it
  becomes ``stopped`` (it is still provisioned: the owner may start it again);
* a supervisor process (``corral-sup``) that no state claims: killed, with its sandbox;
* a Corral sandbox cgroup that no live sandbox claims: emptied and removed;
* (root) an isolation_session identity whose sandbox is gone: released (account, files, ACLs);
  the processes of one that is not started (a start that crashed half-way): ended.
  slirp4netns needs nothing here: it exits with the supervisor that holds its exit pipe.
* a policy proxy (``corral-proxy``) whose sandbox is not running: ended (it also exits by
  itself through the same exit pipe; this catches one that could not).
* (root) a micro-VM's QEMU run directory whose owner is gone, with a QEMU that outlived it and
  its cgroup (lifecycle/microvm.py).

Only the caller's own uid is touched, except for root, which cleans for everyone. Live
sandboxes are never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any

from corral.lifecycle import manager, microvm, network_policy, session, store
from corral.lifecycle.launch import SUPERVISOR_NAME, kill_supervisor

_LIFECYCLE_GROUP = re.compile(r"sandbox-[0-9a-f]{24}")


def collect() -> dict[str, Any]:
    uid = os.getuid()
    report: dict[str, list[Any]] = {
        "removed": [], "stopped": [], "killed": [], "cgroups": [], "identities": [], "vms": []
    }  # fmt: skip
    claimed: set[tuple[int, int]] = set()
    live_tokens: set[str] = set()
    for _, base in _scope(uid):
        with contextlib.suppress(FileNotFoundError):
            for token in os.listdir(base):
                path = os.path.join(base, token)
                try:
                    live = _collect_one(path, report, claimed)
                except OSError:  # not a sandbox directory we can read: garbage
                    manager.remove_sandbox(path, None)
                    report["removed"].append(token)
                    continue
                if live:
                    live_tokens.add(token)
    for pid, start in _supervisors(uid):
        if (pid, start) not in claimed:
            kill_supervisor(pid, start)
            report["killed"].append(pid)
    report["killed"] += network_policy.end_orphaned_proxies(uid)
    report["vms"] = microvm.collect()
    for sandbox_id in session.orphaned_bindings(live_tokens):
        session.unbind(sandbox_id)
        report["identities"].append(sandbox_id)
    for ident in session.abandoned_identities(live_tokens):
        from corral.backends.session import identity as identities

        identities.release(ident)
        report["identities"].append(ident.name)
    for path in sandbox_cgroups():
        if path.rpartition("sandbox-")[2] not in live_tokens and _empty(path):
            from corral.kernel import cgroups

            cgroups.remove_leftover(path)
            report["cgroups"].append(path)
    return report


def _collect_one(path: str, report: dict[str, list[Any]], claimed: set[tuple[int, int]]) -> bool:
    """Clean one sandbox directory; whether it is a live (kept) sandbox."""
    with store.locked(path):
        state = store.load(path)
        if state is None or state.phase == "deprovisioning":
            manager.remove_sandbox(path, state)
            report["removed"].append(os.path.basename(path))
            return False
        if session.needs_root(state.id) and os.geteuid() == 0:
            state.supervisor_pid, state.supervisor_start = session.trusted_supervisor(state.id)
            if state.phase != "started":
                session.end_stray_processes(state.id, state.owner_uid)
        if state.phase == "started" and not store.supervisor_alive(state):
            manager.notice_crash(path, state)
            report["stopped"].append(state.id)
        if state.supervisor_pid is not None and state.supervisor_start is not None:
            claimed.add((state.supervisor_pid, state.supervisor_start))
        return True


def _scope(uid: int) -> list[tuple[int, str]]:
    if uid == 0:
        return list(store.user_dirs())
    return [(uid, store.user_dir(uid, create=False))]


def _supervisors(uid: int) -> list[tuple[int, int]]:
    """(pid, start time) of every Corral supervisor of this run directory that ``uid`` owns
    (root: everyone's). A supervisor is recognised by its name *and* by holding a control
    socket bound under this run directory, so another run directory's sandboxes (and any
    process that merely borrowed the name) are left alone."""
    return [
        (pid, start)
        for pid, start in corral_processes(store.run_dir(), {SUPERVISOR_NAME})
        if uid == 0 or process_owner(pid) == uid
    ]


def corral_processes(base: str, names: set[str]) -> list[tuple[int, int]]:
    """Live (not zombie) processes named in ``names`` holding a unix socket bound under ``base``."""
    return [(pid, start) for pid, start, _ in held_sockets(base, names)]


def held_sockets(base: str, names: set[str]) -> list[tuple[int, int, str]]:
    """(pid, start time, socket path) of each live (not zombie) process named in ``names``
    holding a unix socket bound under ``base`` (the first such path, in sorted order)."""
    paths = _socket_paths_under(base)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() not in names:
                    continue
            held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        except OSError:
            continue
        start = store.process_start_time(pid)
        bound = sorted(paths[name] for name in held & paths.keys())
        if start is not None and bound:
            found.append((pid, start, bound[0]))
    return found


def _socket_paths_under(base: str) -> dict[str, str]:
    """``socket:[inode]`` name → path of the unix sockets bound to a path under ``base``."""
    prefix = os.path.realpath(base) + "/"
    found = {}
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) >= 8 and fields[7].startswith(prefix):
                found[f"socket:[{fields[6]}]"] = fields[7]
    return found


def _empty(cgroup: str) -> bool:
    """No process left (a populated one may belong to another run directory's sandbox)."""
    try:
        with open(os.path.join(cgroup, "cgroup.procs")) as f:
            return not f.read().strip()
    except OSError:
        return False


def process_owner(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def sandbox_cgroups() -> list[str]:
    """Lifecycle sandboxes' cgroups (``<prefix>/sandbox-<24 hex>``) in every hierarchy;
    one-shot runs' groups have shorter names and are not ours."""
    try:
        from corral.kernel import cgroups
    except ImportError:
        return []
    return [p for p in cgroups.list_leftovers() if _LIFECYCLE_GROUP.fullmatch(os.path.basename(p))]
