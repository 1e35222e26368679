"""What a session sandbox adds to a process sandbox, around one agent identity.

:func:`prepare_session` turns a process plan into the session plan (workspace granted
read-write, the human's session variables scrubbed, host paths of the human's session hidden,
ACLs for consented read-write grants) and starts the private display and the clipboard broker
the ``ui`` policy asks for. :meth:`SessionSetup.adjust` then edits the launcher's ChildSpec: the
workload becomes the agent uid and joins a session keyring of its own.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from corral.backends.process.launcher import ChildSpec
from corral.backends.process.rootfs import MountStep
from corral.backends.session import acl
from corral.backends.session.identity import AgentIdentity, record_grant
from corral.errors import BackendUnavailableError, PolicyError
from corral.plan import Plan
from corral.policy.filesystem import FilesystemPolicy, PathEntry, is_within
from corral.ui.broker import BrokerConfig, ClipboardBroker, HumanDisplay
from corral.ui.display import PrivateDisplay, start_private_display

# Variables that lead into the human's desktop session; never passed to the agent.
HUMAN_SESSION_VARIABLES = (
    "DISPLAY", "XAUTHORITY", "XAUTHLOCALHOSTNAME", "WAYLAND_DISPLAY", "WAYLAND_SOCKET",
    "DBUS_SESSION_BUS_ADDRESS", "DBUS_STARTER_ADDRESS", "SSH_AUTH_SOCK", "SSH_AGENT_PID",
    "SSH_ASKPASS", "GPG_AGENT_INFO", "XDG_RUNTIME_DIR", "XDG_SESSION_ID", "XDG_SESSION_COOKIE",
    "XDG_SEAT", "XDG_VTNR", "PULSE_SERVER", "PULSE_COOKIE", "PIPEWIRE_REMOTE",
    "PIPEWIRE_RUNTIME_DIR", "SESSION_MANAGER", "GNOME_KEYRING_CONTROL", "GNOME_KEYRING_PID",
    "KRB5CCNAME", "WINDOWID", "DESKTOP_STARTUP_ID", "TMUX", "TMUX_PANE", "STY",
)  # fmt: skip
# Host places where a human session keeps its sockets: hidden even inside a broader grant.
HUMAN_SESSION_PATHS = ("/tmp/.X11-unix", "/tmp/.ICE-unix", "/run/user", "/run/dbus")
X11_SOCKET_DIR = "/tmp/.X11-unix"


@dataclass
class SessionSetup:
    identity: AgentIdentity
    plan: Plan  # the session plan the process launcher runs
    display: PrivateDisplay | None = None
    broker: ClipboardBroker | None = None
    _closed: bool = field(default=False, repr=False)

    def adjust(self, spec: ChildSpec) -> None:
        """Make the launcher's workload the agent identity, in its own keyring session."""
        spec.run_as = (self.identity.uid, self.identity.gid)
        spec.new_session_keyring = True
        if self.display is not None:
            spec.mount_steps.append(
                MountStep("symlink", X11_SOCKET_DIR, target=self.display.address.socket_dir)
            )

    @property
    def helper_pids(self) -> list[int]:
        """The display's and the broker's processes: what a long-lived sandbox records."""
        if self.display is None:
            return []
        return [self.display.address.server_pid, *(self.broker.pids if self.broker else [])]

    def let_go(self) -> None:
        """Leave a detached display and broker running for a long-lived sandbox (its owner
        stops them by :attr:`helper_pids`)."""
        self._closed = True
        if self.display is not None:
            self.display.let_go()

    def close(self) -> None:
        """Stop the broker and the display (idempotent). The identity is released apart."""
        if self._closed:
            return
        self._closed = True
        if self.broker is not None:
            self.broker.close()
        if self.display is not None:
            self.display.close()


def dacl_mutation_allowed(plan: Plan) -> bool:
    fallback = plan.request.raw.get("fallback", {})
    return isinstance(fallback, dict) and fallback.get("allowDaclMutation") is True


def prepare_session(
    plan: Plan, identity: AgentIdentity, *, human: HumanDisplay | None, detached: bool = False
) -> SessionSetup:
    """The session plan for ``identity``, with its display and broker running. ``detached``
    (a long-lived sandbox): both outlive the caller, see :meth:`SessionSetup.let_go`."""
    _check_ui(plan, human)
    filesystem = _session_filesystem(plan, identity)
    _grant_human_paths(plan, identity)
    setup = SessionSetup(identity, plan)
    try:
        env = {k: v for k, v in plan.env.items() if k not in HUMAN_SESSION_VARIABLES}
        env.update(HOME=identity.workspace, USER=identity.name, LOGNAME=identity.name)
        if not plan.ui.disable:
            setup.display = start_private_display(
                identity.display_dir, identity.uid, identity.gid, detached=detached
            )
            env.update(setup.display.address.client_env())
            filesystem = _with_entries(
                filesystem,
                [PathEntry(identity.display_dir, "ro", identity.display_dir, True, "session")],
            )
            if plan.ui.clipboard != "none":
                assert human is not None and plan.ui.clipboard in ("read", "write", "all")
                config = BrokerConfig(human, setup.display.address, plan.ui.clipboard)
                setup.broker = ClipboardBroker(config, detached=detached)
        assert plan.request.process is not None
        cwd = plan.cwd if plan.request.process.cwd is not None else identity.workspace
        setup.plan = dataclasses.replace(plan, filesystem=filesystem, env=env, cwd=cwd)
    except BaseException:
        setup.close()
        raise
    return setup


def _check_ui(plan: Plan, human: HumanDisplay | None) -> None:
    ui = plan.ui
    if ui.injection:
        raise PolicyError(
            "ui.injection=true (synthetic input) is not offered by isolation_session",
            details={"path": "ui.injection"},
            remediation="leave ui.injection false",
        )
    if ui.clipboard != "none" and ui.disable:
        raise PolicyError(
            f"ui.clipboard={ui.clipboard} needs ui.disable=false: the broker copies between the "
            "human's clipboard and the sandbox's private display",
            details={"path": "ui.clipboard"},
            remediation='set "ui": {"disable": false, ...} or "clipboard": "none"',
        )
    if ui.clipboard != "none" and human is None:
        raise BackendUnavailableError(
            f"ui.clipboard={ui.clipboard} needs the human's display, and the caller named none",
            remediation="run from the desktop session (DISPLAY set) or set clipboard to none",
        )
    if not ui.disable and any(
        e.access != "deny" and is_within(X11_SOCKET_DIR, e.path) for e in plan.filesystem.entries
    ):
        raise PolicyError(
            "a grant of the host's /tmp (or a parent) cannot be combined with ui.disable=false "
            "in isolation_session: /tmp/.X11-unix must be the sandbox's own",
            details={"path": "filesystem.readwritePaths"},
            remediation="grant a directory below /tmp instead, or keep ui.disable true",
        )


def _session_filesystem(plan: Plan, identity: AgentIdentity) -> FilesystemPolicy:
    os.chown(identity.workspace, identity.uid, identity.gid)
    added = [PathEntry(identity.workspace, "rw", identity.workspace, True, "session")]
    # With a private display, /tmp/.X11-unix becomes its socket directory instead (and no
    # grant may cover the host's, see _check_ui).
    hidden = [p for p in HUMAN_SESSION_PATHS if plan.ui.disable or p != X11_SOCKET_DIR]
    added += [
        PathEntry(path, "deny", path, True, "session")
        for path in hidden
        if os.path.isdir(path) and not os.path.islink(path)
    ]
    return _with_entries(plan.filesystem, added)


def _with_entries(fs: FilesystemPolicy, added: list[PathEntry]) -> FilesystemPolicy:
    by_path = {e.path: e for e in fs.entries}
    by_path.update({e.path: e for e in added})
    entries = sorted(by_path.values(), key=lambda e: (e.path.count("/"), e.path))
    return FilesystemPolicy(tuple(entries), fs.warnings)


def _grant_human_paths(plan: Plan, identity: AgentIdentity) -> None:
    """Read-write grants of host paths (the human's files) become writable for the agent uid
    only through ACLs, and only with the request's ``fallback.allowDaclMutation`` consent."""
    wanted = [
        e
        for e in plan.filesystem.entries
        if e.access == "rw" and e.origin == "request" and not is_within(e.path, identity.workspace)
    ]
    if wanted and not dacl_mutation_allowed(plan):
        names = ", ".join(repr(e.requested) for e in wanted)
        raise PolicyError(
            f"isolation_session runs the agent under its own uid, which cannot write {names}; "
            "making them writable means adding POSIX ACL entries for the agent's uid",
            details={"path": "filesystem.readwritePaths", "grants": [e.requested for e in wanted]},
            remediation='consent with "fallback": {"allowDaclMutation": true} (the entries are '
            "removed when the sandbox is released), or work in the ephemeral workspace",
        )
    for entry in wanted:
        record_grant(identity, entry.path)  # first: a crash in between still gets cleaned up
        acl.grant_write(entry.path, identity.uid)
