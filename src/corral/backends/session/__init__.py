"""The `session` backend (MXC's ``isolation_session``): a process sandbox whose workload runs
under an ephemeral host identity of its own, cut off from the human's desktop session, with
the `ui` policy enforced (private display, brokered clipboard, no input injection)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from typing import Any

from corral.backends.base import BackendInfo, LaunchOptions, SandboxProcess
from corral.backends.session.identity import (
    ID_RANGE,
    SESSIONS_ROOT,
    AgentIdentity,
    allocate,
    list_leftover_identities,
    lookup,
    release,
)
from corral.backends.session.sandbox import SessionSetup, prepare_session
from corral.plan import Plan
from corral.ui.broker import HumanDisplay

NAME = "session"
CONTAINMENTS = ("isolation_session",)

__all__ = [
    "AgentIdentity",
    "SessionBackend",
    "SessionSetup",
    "allocate",
    "human_display_from",
    "list_leftover_identities",
    "lookup",
    "prepare_session",
    "release",
]


class SessionBackend:
    name = NAME

    def __init__(self, human: HumanDisplay | None = None) -> None:
        """``human``: the desktop the clipboard broker talks to; default: the caller's
        DISPLAY/XAUTHORITY. The Corral service passes the client's instead."""
        self.human = human

    def probe(self) -> BackendInfo:
        return _probe()

    def launch(self, plan: Plan, options: LaunchOptions) -> SandboxProcess:
        """One-shot: a fresh identity for this run, released when the handle is closed."""
        from corral.backends import process

        identity = allocate()
        setup: SessionSetup | None = None
        try:
            setup = prepare_session(
                plan, identity, human=self.human or human_display_from(os.environ)
            )
            cleanups: list[Callable[[], None]] = [functools.partial(release, identity), setup.close]
            return process.launch(setup.plan, options, adjust=setup.adjust, extra_cleanups=cleanups)
        except BaseException:
            if setup is not None:
                setup.close()
            release(identity)
            raise

    @staticmethod
    def provision_metadata(identity: AgentIdentity) -> dict[str, Any]:
        """MXC's provision result fields. Linux has no SIDs: ``agentUserSid`` carries the uid,
        written ``uid:<n>`` so nobody mistakes it for a Windows SID."""
        return {
            "agentUserName": identity.name,
            "agentUserSid": f"uid:{identity.uid}",
            "ephemeralWorkspacePath": identity.workspace,
        }


def human_display_from(env: Mapping[str, str], uid: int | None = None) -> HumanDisplay | None:
    """The human's display named by ``env`` (a caller's environment), if any."""
    display = env.get("DISPLAY")
    if not display:
        return None
    return HumanDisplay(display, env.get("XAUTHORITY"), uid, None if uid is None else _gid_of(uid))


def _gid_of(uid: int) -> int:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_gid
    except KeyError:
        return uid


@functools.cache
def _probe() -> BackendInfo:
    if os.geteuid() != 0:
        return BackendInfo(
            NAME,
            False,
            "isolation_session creates a host account per sandbox, which needs root: send the "
            "request through the Corral service (`corral serve`, run as root)",
            containments=CONTAINMENTS,
        )
    from corral.backends.process import ProcessBackend
    from corral.ui.probe import probe_ui

    base = ProcessBackend().probe()
    if not base.available:
        return BackendInfo(NAME, False, base.reason, containments=CONTAINMENTS)
    mechanisms = dict(base.mechanisms)
    mechanisms["agent-identity"] = (
        f"ephemeral host account per sandbox (uids {ID_RANGE.start}-{ID_RANGE.stop - 1}), "
        f"workspace under {SESSIONS_ROOT}, removed with everything it owned"
    )
    mechanisms["session-keyring"] = (
        "own kernel session keyring; own session (setsid), no tty of the caller"
    )
    os.makedirs(SESSIONS_ROOT, mode=0o711, exist_ok=True)
    mechanisms.update(probe_ui(SESSIONS_ROOT))
    return BackendInfo(NAME, True, mechanisms=mechanisms, containments=CONTAINMENTS)
