"""Shared fixtures: run requests as root and as an unprivileged test user."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
TEST_USER = "corral-test"


def ensure_test_user(name: str = TEST_USER) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-K", "HOME_MODE=0700", name], check=True)
        return pwd.getpwnam(name)


@dataclass
class Result:
    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool


class Runner:
    """Runs a wire request through the SDK as ``user`` (None: this process, root)."""

    def __init__(self, user: pwd.struct_passwd | None, src: str | None) -> None:
        self.user = user
        self.src = src
        self.uid = user.pw_uid if user else os.getuid()
        self.gid = user.pw_gid if user else os.getgid()
        self.name = user.pw_name if user else "root"

    def run(self, request: dict[str, Any]) -> Result:
        request = {"version": "1.0.0", **request}
        if self.user is None:
            import corral

            r = corral.run(request)
            return Result(r.stdout, r.stderr, r.exit_code, r.timed_out)
        code = (
            "import json,sys,corral\n"
            "try:\n r=corral.run(json.load(sys.stdin))\n"
            " print(json.dumps([r.stdout,r.stderr,r.exit_code,r.timed_out]))\n"
            "except corral.CorralError as e:\n print(json.dumps(['',str(e),-1,False]))\n"
        )
        proc = subprocess.run(
            ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
             "--reset-env", "env", f"PYTHONPATH={self.src}", f"HOME={self.user.pw_dir}",
             sys.executable, "-c", code],
            input=json.dumps(request), capture_output=True, text=True, timeout=120, cwd="/",
        )  # fmt: skip
        if proc.returncode != 0:
            raise AssertionError(f"runner failed: {proc.stderr}")
        out, err, exit_code, timed_out = json.loads(proc.stdout)
        return Result(out, err, exit_code, timed_out)

    def make_dir(self, parent: str, name: str) -> str:
        path = os.path.join(parent, name)
        os.makedirs(path, exist_ok=True)
        os.chown(path, self.uid, self.gid)
        return path

    def write(self, path: str, text: str) -> str:
        with open(path, "w") as f:
            f.write(text)
        os.chown(path, self.uid, self.gid)
        return path


@pytest.fixture(scope="session", autouse=True)
def _private_audit_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Tests audit into their own log, not the machine's /var/log/corral."""
    old = os.environ.get("CORRAL_AUDIT_LOG")
    os.environ["CORRAL_AUDIT_LOG"] = str(tmp_path_factory.mktemp("audit") / "audit.jsonl")
    yield
    if old is None:
        os.environ.pop("CORRAL_AUDIT_LOG", None)
    else:
        os.environ["CORRAL_AUDIT_LOG"] = old


@pytest.fixture(scope="session")
def user_src() -> Iterator[str]:
    """A world-readable copy of the package for the unprivileged user (checkouts may live in
    a 0700 home), with the native launcher built first (the user cannot build it there)."""
    from corral.native import launcher_path

    launcher_path()
    path = tempfile.mkdtemp(prefix="corral-src-")
    shutil.copytree(os.path.join(SRC, "corral"), os.path.join(path, "corral"))
    subprocess.run(["chmod", "-R", "a+rX", path], check=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["root", "user"])
def runner(request: pytest.FixtureRequest, user_src: str) -> Runner:
    if request.param == "root":
        return Runner(None, None)
    return Runner(ensure_test_user(), user_src)


@pytest.fixture
def root_runner() -> Runner:
    return Runner(None, None)


@pytest.fixture
def area(runner: Runner) -> Iterator[str]:
    """A scratch directory both the test and the runner's user can use (not under /tmp's
    0700 pytest tree)."""
    path = tempfile.mkdtemp(prefix="corral-t-", dir="/var/tmp")
    os.chmod(path, 0o755)
    os.chown(path, runner.uid, runner.gid)
    yield path
    shutil.rmtree(path, ignore_errors=True)
