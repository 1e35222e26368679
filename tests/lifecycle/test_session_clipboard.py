"""The clipboard broker of a long-lived isolation_session sandbox: it runs from start to stop
(and again at the next start), copies only the way ``ui.clipboard`` allows between the human's
display (a real Xvfb here) and the sandbox's private one, holds no privilege, and leaves nothing
running after stop, deprovision, or a crash cleaned up by `corral gc`."""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import pwd
import secrets
import signal
import struct
import subprocess
import time
from collections.abc import Iterator

import pytest
from lifecycle_support import needs_lifecycle
from tests.lifecycle.test_session_display import (  # noqa: F401 (human: the desktop fixture)
    PROVISION,
    _start_in_a_process_that_exits,
    human,
)
from tests.session.conftest import _free_display
from tests.session.support import HumanDesktop, as_nobody, wait_for
from tests.session.test_desktop import _settled_clipboard

from corral.errors import CorralError

pytestmark = [
    needs_lifecycle,
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="creates host accounts: root"),
]

# The agent waits for what the broker may bring in, then copies its own text.
READ_THEN_COPY = """
seen=""
for i in $(seq 30); do seen=$(xclip -o -selection clipboard 2>/dev/null) && [ -n "$seen" ] && break; sleep 0.1; done
echo "agent read: ${{seen:-nothing}}"
printf %s {agent_text} | xclip -i -selection clipboard >/dev/null 2>&1
"""


def _provision(clipboard: str | None) -> str:
    from corral.lifecycle import api

    ui = {"disable": False, **({"clipboard": clipboard} if clipboard else {})}
    return api.provision_container({**PROVISION, "ui": ui}).container_id


def _helpers(sid: str) -> list[int]:
    """What root recorded for the started sandbox: its Xvfb, then the broker's two halves."""
    from corral.lifecycle import session

    with open(session._binding_path(sid)) as f:
        return [pid for pid, _ in json.load(f)["helpers"]]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


@pytest.mark.parametrize("clipboard", ["read", "write", "all", "none", None])
def test_the_clipboard_flows_only_the_allowed_way(
    run_dir: str,
    human: HumanDesktop,  # noqa: F811 (the fixture imported above)
    clipboard: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from corral.lifecycle import api

    human_text = f"human-secret-{secrets.token_hex(4)}"
    agent_text = f"agent-text-{secrets.token_hex(4)}"
    holder = human.set_clipboard(human_text)
    # Baseline: any unsandboxed process of another user reads the human's clipboard.
    stolen = as_nobody(["xclip", "-display", human.display, "-selection", "clipboard", "-o"])
    assert stolen.stdout == human_text
    monkeypatch.setenv("DISPLAY", human.display)  # the desktop the starting caller names
    sid = _provision(clipboard)
    try:
        _start_in_a_process_that_exits(sid)
        brokered = clipboard not in ("none", None)
        assert len(_helpers(sid)) == (3 if brokered else 1)  # Xvfb (+ the broker's halves)
        ran = api.run_in_container(sid, READ_THEN_COPY.format(agent_text=agent_text))
        assert ran.exit_code == 0, ran.stderr
        human_now = _settled_clipboard(human, expect=agent_text)
    finally:
        holder.kill()
        holder.wait()
    may_read, may_write = clipboard in ("read", "all"), clipboard in ("write", "all")
    assert ran.stdout == f"agent read: {human_text if may_read else 'nothing'}\n"
    assert human_now == (agent_text if may_write else human_text)
    api.deprovision_container(sid)


def test_the_broker_lives_with_the_started_sandbox_and_holds_no_privilege(
    run_dir: str,
    human: HumanDesktop,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from corral.lifecycle import api

    monkeypatch.setenv("DISPLAY", human.display)
    sid = _provision("all")
    _start_in_a_process_that_exits(sid)
    xvfb, human_half, sandbox_half = _helpers(sid)
    agent_uid = _status(xvfb)["Uid"].split()[0]
    for pid, uid in ((human_half, "0"), (sandbox_half, agent_uid)):  # root owns this sandbox
        status = _status(pid)
        assert status["Uid"].split() == [uid] * 4 and status["Gid"].split()[0] == uid
        assert status["CapEff"] == status["CapPrm"] == status["CapAmb"] == "0" * 16
        assert status["NoNewPrivs"] == "1" and status["Groups"].strip() == ""
    assert _status(human_half)["CapBnd"] == "0" * 16  # root, yet cannot regain a capability
    for ns in ("mnt", "net"):  # the sandbox half sees what the private display sees
        assert os.readlink(f"/proc/{sandbox_half}/ns/{ns}") == os.readlink(f"/proc/{xvfb}/ns/{ns}")
    assert os.readlink(f"/proc/{human_half}/ns/net") == os.readlink("/proc/self/ns/net")

    api.stop_container(sid)
    assert not any(map(_running, (xvfb, human_half, sandbox_half)))
    _start_in_a_process_that_exits(sid)  # the broker comes back with the sandbox
    xvfb, human_half, sandbox_half = again = _helpers(sid)
    assert all(map(_running, again))
    os.kill(sandbox_half, signal.SIGKILL)  # one half gone: the other ends by itself
    wait_for(lambda: not _running(human_half), "the human half to end with its other half")
    api.deprovision_container(sid)
    assert not any(map(_running, again))


def test_gc_ends_the_broker_of_a_sandbox_whose_supervisor_was_killed(
    run_dir: str,
    human: HumanDesktop,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from corral.lifecycle import gc, session

    monkeypatch.setenv("DISPLAY", human.display)
    sid = _provision("read")
    _start_in_a_process_that_exits(sid)
    helpers = _helpers(sid)
    supervisor, _ = session.trusted_supervisor(sid)
    assert supervisor is not None
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: not _running(supervisor), "the supervisor to die")
    time.sleep(0.5)
    assert all(map(_running, helpers))  # nothing ends them but root's record ...
    assert sid in gc.collect()["stopped"]  # ... which `corral gc` finds
    assert not any(map(_running, helpers))


def _cookie_entry(number: int, cookie: bytes) -> bytes:
    """One Xauthority entry: MIT-MAGIC-COOKIE-1 for display ``number``, any host."""

    def counted(data: bytes) -> bytes:
        return struct.pack(">H", len(data)) + data

    name = counted(b"MIT-MAGIC-COOKIE-1") + counted(cookie)
    return struct.pack(">H", 65535) + counted(b"") + counted(str(number).encode()) + name


@pytest.fixture
def root_desktop(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HumanDesktop]:
    """Root's own desktop, named by the environment the service runs in: an X server that
    accepts only holders of a cookie in a root-only file (DISPLAY, XAUTHORITY set)."""
    number = _free_display()
    cookie_file = tmp_path / "root.Xauthority"
    cookie_file.write_bytes(_cookie_entry(number, secrets.token_bytes(16)))
    cookie_file.chmod(0o600)
    server = subprocess.Popen(
        ["Xvfb", f":{number}", "-nolisten", "tcp", "-noreset", "-auth", str(cookie_file)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    monkeypatch.setenv("DISPLAY", f":{number}")
    monkeypatch.setenv("XAUTHORITY", str(cookie_file))
    desktop = HumanDesktop(number, server)
    try:
        wait_for(lambda: os.path.exists(desktop.socket), "root's X server")
        yield desktop
    finally:
        server.terminate()
        server.wait(timeout=10)


def _private_clipboard(sid: str) -> str:
    """The sandbox's private clipboard, read as its agent would."""
    from corral.backends.session.identity import display_dir_of
    from corral.lifecycle import session
    from corral.ui.display import DisplayAddress

    with open(session._binding_path(sid)) as f:
        agent = pwd.getpwnam(json.load(f)["identity"])
    address = DisplayAddress(
        display_dir_of(agent.pw_name), agent.pw_uid, agent.pw_gid, _helpers(sid)[0]
    )
    argv = address.client_command(["xclip", "-o", "-selection", "clipboard"])
    return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout


def test_the_broker_reaches_the_human_display_only_as_the_sandbox_owner(
    root_desktop: HumanDesktop, service: str
) -> None:
    """The service runs in root's desktop session (its DISPLAY/XAUTHORITY name root's X
    server). The broker uses the display the *caller* names, never the service's: a user who
    names none is refused, and a user who names root's display and cookie gets nothing of
    root's (the broker talks to that server as the user, who cannot read root's cookie)."""
    from test_users import _as, _ok, _user

    from corral.lifecycle import api

    root_text = f"root-secret-{secrets.token_hex(4)}"
    holder = root_desktop.set_clipboard(root_text)  # as root, with root's XAUTHORITY
    own = sid = None
    try:
        # Baseline: a client holding root's credentials reads it; another user's cannot.
        assert root_desktop.clipboard() == root_text
        stolen = as_nobody(["xclip", "-selection", "clipboard", "-o"], env=dict(os.environ))
        assert stolen.returncode != 0 and root_text not in stolen.stdout
        request = {**PROVISION, "ui": {"disable": False, "clipboard": "read"}}
        # Control: root's own sandbox (started here, as root) does get root's clipboard.
        own = api.provision_container(request).container_id
        api.start_container(own)
        wait_for(lambda: _private_clipboard(own) == root_text, "root's text in root's sandbox")
        alice = _user("corral-alice")
        sid = _ok(_as(alice, service, "provision", {"request": request}))["sandboxId"]
        refused = _as(alice, service, "start", {"sandboxId": sid})
        assert refused["error"]["code"] == "backend_unavailable", refused
        roots = {name: os.environ[name] for name in ("DISPLAY", "XAUTHORITY")}
        _ok(_as(alice, service, "start", {"sandboxId": sid, "display": roots}))
        _, human_half, _ = _helpers(sid)
        assert _status(human_half)["Uid"].split() == [str(alice.pw_uid)] * 4
        time.sleep(2)  # eight broker polls
        assert _private_clipboard(sid) == ""
        _ok(_as(alice, service, "deprovision", {"sandboxId": sid}))
        sid = None
        api.deprovision_container(own)
        own = None
    finally:
        holder.kill()
        holder.wait()
        # A failed assertion must not leave sandboxes (and their displays) running.
        if sid is not None:
            _as(alice, service, "deprovision", {"sandboxId": sid})
        if own is not None:
            with contextlib.suppress(CorralError):
                api.deprovision_container(own)
