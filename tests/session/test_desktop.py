"""A session sandbox never touches the human's display; the `ui` policy decides what it gets
instead (nothing, or a private display) and which way the clipboard may flow."""

from __future__ import annotations

import os
import secrets
import subprocess
import time

import pytest
from tests.session.support import HUMAN_GEOMETRY, HumanDesktop, as_nobody, session_request

import corral

PRIVATE_UI = {"disable": False}
AS_NOBODY = "setpriv --reuid=65534 --regid=65534 --clear-groups"

# Every way a client can reach display :N, tried from inside the sandbox.
REACH_HUMAN_DISPLAY = """
n={n}
echo "env DISPLAY=${{DISPLAY:-unset}} XAUTHORITY=${{XAUTHORITY:-unset}}"
xdpyinfo -display :$n >/dev/null 2>&1 && echo "REACHED by DISPLAY=:$n"
ls -A /tmp/.X11-unix 2>/dev/null | grep -qx "X$n" && echo "SEES socket file X$n"
python3 - <<EOF
import socket
for name, address in (("abstract", "\\0/tmp/.X11-unix/X$n"), ("file", "/tmp/.X11-unix/X$n")):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(address)
        print("REACHED by", name, "socket")
    except OSError as exc:
        print(name, "socket:", exc.strerror)
EOF
"""


def _host_shell(script: str) -> str:
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=15).stdout


def test_attacks_on_the_human_display_work_unsandboxed(human: HumanDesktop) -> None:
    """Baseline: a normal process of another uid reaches the human's display by its DISPLAY,
    by the abstract socket alone (private /tmp) and by the socket file alone (private netns)."""
    assert HUMAN_GEOMETRY in as_nobody(["xdpyinfo", "-display", human.display]).stdout
    abstract_only = _host_shell(
        "unshare --mount --propagation private sh -c "
        f"'mount -t tmpfs tmpfs /tmp && {AS_NOBODY} xdpyinfo -display {human.display}'"
    )
    file_only = _host_shell(f"unshare --net {AS_NOBODY} xdpyinfo -display {human.display}")
    assert HUMAN_GEOMETRY in abstract_only
    assert HUMAN_GEOMETRY in file_only


@pytest.mark.timeout(60)
@pytest.mark.parametrize("ui", [{"disable": True}, PRIVATE_UI], ids=["ui-disabled", "ui-private"])
def test_sandbox_cannot_open_the_human_display(human: HumanDesktop, ui: dict[str, bool]) -> None:
    # The request even hands it the human's DISPLAY and, without a private display, a grant of
    # the host's X socket directory.
    request = session_request(
        REACH_HUMAN_DISPLAY.format(n=human.number),
        process={"env": [f"DISPLAY={human.display}", "XAUTHORITY=/root/.Xauthority"],
                 "inheritDefaultEnv": True},
        filesystem={"readonlyPaths": ["/tmp/.X11-unix"]} if ui["disable"] else {},
        ui=ui,
    )  # fmt: skip
    result = corral.run(request)
    assert result.exit_code == 0, result.stderr
    assert "abstract socket:" in result.stdout and "file socket:" in result.stdout
    assert "REACHED" not in result.stdout
    assert f"SEES socket file X{human.number}" not in result.stdout
    assert f"DISPLAY={human.display} " not in result.stdout
    assert "XAUTHORITY=/root/.Xauthority" not in result.stdout
    if ui["disable"]:
        assert "env DISPLAY=unset XAUTHORITY=unset" in result.stdout


@pytest.mark.timeout(60)
def test_private_display_is_drawable_and_not_the_humans(human: HumanDesktop) -> None:
    command = (
        "xdpyinfo | grep dimensions; xdotool getdisplaygeometry; "
        "xdotool mousemove 10 20 && xdotool getmouselocation; "
        "test -e /dev/uinput && echo HAS-UINPUT; true"
    )
    result = corral.run(session_request(command, ui=PRIVATE_UI))
    assert result.exit_code == 0, result.stderr
    assert "dimensions:    1280x800" in result.stdout
    assert "1280 800" in result.stdout
    assert "x:10 y:20" in result.stdout
    assert HUMAN_GEOMETRY not in result.stdout
    assert "HAS-UINPUT" not in result.stdout  # no synthetic input device, whatever the policy


CLIPBOARD_PROBE = """
seen=""
for i in $(seq 20); do seen=$(xclip -o -selection clipboard 2>/dev/null) && [ -n "$seen" ] && break; sleep 0.1; done
echo "agent read: ${{seen:-nothing}}"
printf %s {agent_text} | xclip -i -selection clipboard
echo "agent wrote"
sleep 5
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("direction", ["none", "read", "write", "all"])
def test_clipboard_flows_only_in_the_allowed_direction(
    human: HumanDesktop, direction: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    human_text = f"human-secret-{secrets.token_hex(4)}"
    agent_text = f"agent-text-{secrets.token_hex(4)}"
    holder = human.set_clipboard(human_text)
    # Baseline: any unsandboxed process of another user reads it.
    stolen = as_nobody(["xclip", "-display", human.display, "-selection", "clipboard", "-o"])
    assert stolen.stdout == human_text
    monkeypatch.setenv("DISPLAY", human.display)  # the caller's desktop, as the broker sees it
    request = session_request(
        CLIPBOARD_PROBE.format(agent_text=agent_text),
        ui={"disable": False, "clipboard": direction},
        process={"env": [f"DISPLAY={human.display}"], "inheritDefaultEnv": True},
    )
    try:
        with corral.spawn(request) as proc:
            assert proc.stdout is not None
            agent_read = proc.stdout.readline().decode()
            assert proc.stdout.readline() == b"agent wrote\n"
            human_now = _settled_clipboard(human, expect=agent_text)
            proc.kill()
    finally:
        holder.kill()
        holder.wait()
    may_read = direction in ("read", "all")
    assert agent_read.strip() == f"agent read: {human_text if may_read else 'nothing'}"
    assert human_now == (agent_text if direction in ("write", "all") else human_text)


def _settled_clipboard(human: HumanDesktop, *, expect: str) -> str:
    """The human's clipboard once ``expect`` arrived, or after long enough that it would have
    (the broker polls every 0.25 s)."""
    deadline = time.monotonic() + 2.0
    while time.monotonic() < deadline:
        now = human.clipboard()
        if now == expect:
            return now
        time.sleep(0.1)
    return human.clipboard()


def test_clipboard_without_a_private_display_is_refused() -> None:
    with pytest.raises(corral.CorralError) as caught:
        corral.run(session_request("true", ui={"disable": True, "clipboard": "read"}))
    assert "ui.disable=false" in caught.value.message


@pytest.mark.timeout(60)
def test_private_display_is_the_agents_alone() -> None:
    """Other host users cannot reach the sandbox's display, and even root needs its cookie."""
    with corral.spawn(session_request('echo "$XAUTHORITY"; sleep 30', ui=PRIVATE_UI)) as proc:
        assert proc.stdout is not None
        cookie = proc.stdout.readline().decode().strip()
        socket_dir = os.path.join(os.path.dirname(cookie), ".X11-unix")
        assert os.path.exists(f"{socket_dir}/X0")  # the sandbox's display is up
        reach = f"import socket; socket.socket(socket.AF_UNIX).connect('{socket_dir}/X0')"
        other_user = as_nobody(["/usr/bin/python3", "-c", reach])
        assert "PermissionError" in other_user.stderr
        client = (
            "unshare --mount --propagation private sh -c 'mount -t tmpfs tmpfs /tmp && "
            f"ln -s {socket_dir} /tmp/.X11-unix && XAUTHORITY=%s xdpyinfo -display :0 2>&1'"
        )
        assert "dimensions:    1280x800" in _host_shell(client % cookie)  # the right path
        assert "unable to open display" in _host_shell(client % "/dev/null")
        proc.kill()
