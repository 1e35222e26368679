"""Does the `ui` policy really work on this host? Start a private display and round-trip a
clipboard value through it, as the broker would."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence

from corral.ui.display import start_private_display

PROBE_TEXT = b"corral-ui-probe"


def probe_ui(state_root: str) -> dict[str, str]:
    """Mechanism name -> detail for what works here (empty when nothing does). Root only."""
    mechanisms: dict[str, str] = {}
    nobody = pwd.getpwnam("nobody")
    scratch = tempfile.mkdtemp(prefix="ui-probe-", dir=state_root)
    os.chmod(scratch, 0o711)  # the display's uid traverses it
    try:
        display = start_private_display(
            f"{scratch}/display", nobody.pw_uid, nobody.pw_gid, timeout=5
        )
    except Exception:  # any failure means: not available, and the planner will say so
        shutil.rmtree(scratch, ignore_errors=True)
        return mechanisms
    try:
        mechanisms["private-display"] = (
            "Xvfb per sandbox, as the agent uid, in its own mount and network namespaces, "
            "cookie-authenticated, no TCP"
        )
        if _clipboard_round_trip(display.address.client_command):
            mechanisms["clipboard-broker"] = "Corral broker (xclip), allowed direction only"
    finally:
        display.close()
        shutil.rmtree(scratch, ignore_errors=True)
    return mechanisms


def _clipboard_round_trip(command: Callable[[Sequence[str]], list[str]]) -> bool:
    holder = subprocess.Popen(
        command(["xclip", "-i", "-quiet", "-selection", "clipboard"]),
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert holder.stdin is not None
        holder.stdin.write(PROBE_TEXT)
        holder.stdin.close()
        for _ in range(20):
            done = subprocess.run(
                command(["xclip", "-o", "-selection", "clipboard"]), capture_output=True, timeout=3
            )
            if done.stdout == PROBE_TEXT:
                return True
            time.sleep(0.05)  # until the holder owns the selection
        return False
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        holder.kill()
        holder.wait()
