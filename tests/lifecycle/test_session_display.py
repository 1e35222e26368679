"""A long-lived isolation_session sandbox with a private display (``ui.disable: false``): the
display outlives the process that started the sandbox, every exec draws on it and never on the
human's, and stop and deprovision leave no display process of the identity behind."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys

import pytest
from lifecycle_support import needs_lifecycle

pytestmark = [
    needs_lifecycle,
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="creates host accounts: root"),
    pytest.mark.skipif(shutil.which("Xvfb") is None, reason="needs Xvfb"),
]

from tests.session.conftest import human  # noqa: E402, F401 (the human's desktop fixture)
from tests.session.support import HUMAN_GEOMETRY, HumanDesktop, as_nobody  # noqa: E402
from tests.session.test_desktop import REACH_HUMAN_DISPLAY  # noqa: E402

PROVISION = {"version": "1.0.0", "phase": "provision", "containment": "isolation_session",
             "network": {"egress": {"default": "deny"}}, "ui": {"disable": False}}  # fmt: skip
DRAW = "echo $DISPLAY; xdpyinfo | grep dimensions; xdotool getmouselocation"


def _start_in_a_process_that_exits(sid: str) -> None:
    """As `corral start` in a terminal: the starter is gone before any exec, and then the
    terminal interrupts its process group (Ctrl-C), which must not reach the display."""
    code = "import sys\nfrom corral.lifecycle import api\napi.start_container(sys.argv[1])"
    starter = subprocess.Popen(
        [sys.executable, "-c", code, sid], stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    _, err = starter.communicate(timeout=60)
    assert starter.returncode == 0, err
    with contextlib.suppress(ProcessLookupError):
        os.killpg(starter.pid, signal.SIGINT)


def _live_processes() -> list[tuple[int, int, str]]:
    """(pid, uid, command line) of every process that is not a zombie (only its parent can reap
    that one; it runs nothing)."""
    out = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] == "Z":
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode()
            out.append((int(entry), os.stat(f"/proc/{entry}").st_uid, cmdline))
        except OSError:
            continue
    return out


def _processes_of(uid: int) -> list[str]:
    return [cmdline for _, owner, cmdline in _live_processes() if owner == uid]


def _xvfbs_of(display_dir: str) -> list[int]:
    """Xvfb processes serving ``display_dir``, whatever their uid."""
    return [pid for pid, _, c in _live_processes() if "Xvfb" in c and display_dir in c]


def _draws_on_its_own_display(sid: str, desktop: HumanDesktop) -> None:
    from corral.lifecycle import api

    ran = api.run_in_container(sid, DRAW)
    assert ran.exit_code == 0, ran.stderr
    assert ran.stdout.startswith(":0\n") and "1280x800 pixels" in ran.stdout
    assert "x:" in ran.stdout and "screen:" in ran.stdout  # xdotool read the pointer
    assert HUMAN_GEOMETRY not in ran.stdout
    attack = api.run_in_container(sid, REACH_HUMAN_DISPLAY.format(n=desktop.number))
    assert attack.exit_code == 0, attack.stderr
    assert "abstract socket:" in attack.stdout and "file socket:" in attack.stdout
    assert (
        "REACHED" not in attack.stdout
        and f"SEES socket file X{desktop.number}" not in attack.stdout
    )


def test_private_display_of_a_long_lived_session_sandbox(
    run_dir: str,
    human: HumanDesktop,  # noqa: F811 (the fixture imported above)
) -> None:
    from corral.backends.session.identity import display_dir_of
    from corral.lifecycle import api, session

    # Baseline: an unsandboxed process of another uid reaches the human's display.
    assert HUMAN_GEOMETRY in as_nobody(["xdpyinfo", "-display", human.display]).stdout
    provisioned = api.provision_container(PROVISION)
    sid, agent = provisioned.container_id, pwd.getpwnam(provisioned.metadata["agentUserName"])
    display_dir = display_dir_of(agent.pw_name)
    _start_in_a_process_that_exits(sid)
    _draws_on_its_own_display(sid, human)
    with open(session._binding_path(sid)) as f:
        (helper, _), *_ = json.load(f)["helpers"]
    assert _xvfbs_of(display_dir) == [helper]  # root recorded the display it started
    api.stop_container(sid)
    assert _processes_of(agent.pw_uid) == [] and _xvfbs_of(display_dir) == []
    _start_in_a_process_that_exits(sid)  # the display comes back with the sandbox
    _draws_on_its_own_display(sid, human)
    api.deprovision_container(sid)
    assert _processes_of(agent.pw_uid) == [] and _xvfbs_of(display_dir) == []
    assert not os.path.exists(display_dir)


def test_a_clipboard_is_refused_at_start_not_silently_dropped(run_dir: str) -> None:
    from corral.errors import CorralError, ErrorCode
    from corral.lifecycle import api

    request = {**PROVISION, "ui": {"disable": False, "clipboard": "read"}}
    sid = api.provision_container(request).container_id
    with pytest.raises(CorralError) as info:
        api.start_container(sid)
    assert info.value.code == ErrorCode.BACKEND_UNAVAILABLE
    assert "clipboard" in str(info.value)
    api.deprovision_container(sid)
