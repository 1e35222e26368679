"""The lifecycle through the command line, as an unprivileged user without the service:
`corral exec` with state-aware envelopes, then `corral ps`, `logs`, `rm`, `gc`."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator

import pytest
from lifecycle_support import needs_lifecycle

pytestmark = [needs_lifecycle, pytest.mark.timeout(120)]
pytestmark.append(pytest.mark.skipif(os.geteuid() != 0, reason="creates a user; needs root"))


@pytest.fixture
def user_env() -> Iterator[tuple[pwd.struct_passwd, dict[str, str], str]]:
    name = "corral-carol"
    try:
        user = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-K", "HOME_MODE=0700", name], check=True)
        user = pwd.getpwnam(name)
    base = tempfile.mkdtemp(prefix="corral-cli-")
    os.chmod(base, 0o755)
    run_dir = os.path.join(base, "corral")
    os.mkdir(run_dir)
    os.chmod(run_dir, 0o1733)  # as root sets /run/corral up
    env = {"PATH": "/usr/bin:/bin", "CORRAL_RUN_DIR": run_dir, "HOME": user.pw_dir}
    if "PYTHONPATH" in os.environ:
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    yield user, env, base
    shutil.rmtree(base, ignore_errors=True)


def test_cli_lifecycle_as_unprivileged_user(
    user_env: tuple[pwd.struct_passwd, dict[str, str], str],
) -> None:
    user, env, base = user_env

    def corral(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "corral", *args], user=user.pw_uid, group=user.pw_gid,
            extra_groups=[], env=env, capture_output=True, text=True, check=check, cwd="/",
        )  # fmt: skip

    def envelope(body: dict[str, object]) -> dict[str, object]:
        path = os.path.join(base, "request.json")
        with open(path, "w") as f:
            json.dump({"version": "1.0.0", **body}, f)
        os.chmod(path, 0o644)
        out = corral("exec", path)
        reply: dict[str, object] = json.loads(out.stdout)["result"]
        return reply

    sid = envelope({"phase": "provision", "containment": "process"})["sandboxId"]
    assert isinstance(sid, str)
    envelope({"phase": "start", "sandboxId": sid})
    write = {"commandLine": "id -u > /tmp/who; echo done"}
    assert envelope({"phase": "exec", "sandboxId": sid, "process": write})["stdout"] == "done\n"
    read = envelope({"phase": "exec", "sandboxId": sid, "process": {"commandLine": "cat /tmp/who"}})
    assert read["stdout"] == f"{user.pw_uid}\n"  # the sandbox runs as its unprivileged owner
    listed = json.loads(corral("ps").stdout)
    assert [(s["sandboxId"], s["phase"]) for s in listed] == [(sid, "started")]
    assert len(corral("logs", sid).stdout.splitlines()) == 2
    again = corral("exec", os.path.join(base, "request.json"), check=False)  # same exec, fine
    assert again.returncode == 0
    start = os.path.join(base, "start.json")
    with open(start, "w") as f:
        json.dump({"version": "1.0.0", "phase": "start", "sandboxId": sid}, f)
    os.chmod(start, 0o644)
    refused = corral("exec", start, check=False)
    assert refused.returncode == 255
    assert json.loads(refused.stderr)["error"]["code"] == "already_started"
    corral("rm", sid)
    assert json.loads(corral("ps").stdout) == []
    gone = corral("rm", sid, check=False)
    assert json.loads(gone.stderr)["error"]["code"] == "stale_id"
    corral("gc")
    assert os.listdir(os.path.join(env["CORRAL_RUN_DIR"], str(user.pw_uid))) == []
