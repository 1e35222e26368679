"""A small real workload for learning mode, a loopback HTTP server, and a runner that
learns and enforces as root (in this process) or as an unprivileged user (a subprocess)."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import corral
import corral.api
from corral.learn import learn_request

# Reads its config, writes its cache, calls the server named on the command line.
APP = """\
import os, sys, urllib.request
home = os.environ["HOME"]
print(open(os.path.join(home, ".config/tool/config.toml")).read().strip())
with open(os.path.join(home, ".cache/tool/result.txt"), "w") as f:
    f.write("cached")
print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())
"""


@dataclass
class Workspace:
    root: str
    home: str
    work: str
    config: str
    secret: str
    cache: str

    @classmethod
    def create(cls, uid: int, gid: int) -> Workspace:
        """Outside /tmp (the sandbox's /tmp is private) and owned by the user who learns."""
        root = tempfile.mkdtemp(prefix="corral-learn-", dir="/var/tmp")
        ws = cls(
            root,
            f"{root}/home",
            f"{root}/work",
            f"{root}/home/.config/tool/config.toml",
            f"{root}/home/.config/tool/secret-token",
            f"{root}/home/.cache/tool",
        )
        os.makedirs(os.path.dirname(ws.config))
        os.makedirs(ws.cache)
        os.makedirs(ws.work)
        for path, text in ((ws.config, "colour = 'blue'\n"), (ws.secret, "s3cr3t\n"),
                           (f"{ws.work}/app.py", APP)):  # fmt: skip
            with open(path, "w") as f:
                f.write(text)
        for dirpath, dirs, files in os.walk(root):
            for name in (dirpath, *(os.path.join(dirpath, n) for n in (*dirs, *files))):
                os.chown(name, uid, gid)
                os.chmod(name, 0o755 if os.path.isdir(name) else 0o644)
        return ws

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def request(self, command: str, **filesystem: list[str]) -> dict[str, Any]:
        """Deny-by-default: the workload's own folder read-only, nothing else."""
        return {
            "version": "1.0.0",
            "process": {
                "commandLine": command,
                "cwd": self.work,
                "env": [f"HOME={self.home}", "PATH=/usr/bin:/bin"],
                "timeout": 30000,
            },
            "filesystem": {"readonlyPaths": [self.work], **filesystem},
        }


@contextmanager
def http_server() -> Iterator[int]:
    """A server on the host's loopback only; the sandbox reaches it as 10.0.2.2."""

    class Pong(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"pong")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pong)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


_USER_SCRIPT = """\
import json, sys
import corral, corral.api
from corral.learn import learn_request
job = json.load(sys.stdin)
try:
    if job["learn"]:
        r = learn_request(corral.api.parse(job["request"]), audit=False)
        out = {"stdout": r.stdout, "stderr": r.stderr, "exit_code": r.exit_code,
               "proposed": r.proposed, "diff": r.diff, "denials": r.denials_as_dicts(),
               "needs_admin": list(r.needs_admin)}
    else:
        r = corral.run(job["request"], audit=False)
        out = {"stdout": r.stdout, "stderr": r.stderr, "exit_code": r.exit_code}
except corral.CorralError as e:
    out = {"error": e.message}
print(json.dumps(out))
"""


class LearnRunner:
    """Learns and runs requests as ``user`` (None: root, in this process)."""

    def __init__(self, user: Any, src: str | None) -> None:
        self.user, self.src = user, src
        self.uid = user.pw_uid if user else 0
        self.gid = user.pw_gid if user else 0

    def learn(self, request: dict[str, Any]) -> dict[str, Any]:
        return self._do(request, learn=True)

    def run(self, request: dict[str, Any]) -> dict[str, Any]:
        return self._do(request, learn=False)

    def _do(self, request: dict[str, Any], *, learn: bool) -> dict[str, Any]:
        if self.user is None:
            if not learn:
                r = corral.run(request, audit=False)
                return {"stdout": r.stdout, "stderr": r.stderr, "exit_code": r.exit_code}
            lr = learn_request(corral.api.parse(request), audit=False)
            return {"stdout": lr.stdout, "stderr": lr.stderr, "exit_code": lr.exit_code,
                    "proposed": lr.proposed, "diff": lr.diff, "denials": lr.denials_as_dicts(),
                    "needs_admin": list(lr.needs_admin)}  # fmt: skip
        proc = subprocess.run(
            ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
             "--reset-env", "env", f"PYTHONPATH={self.src}", f"HOME={self.user.pw_dir}",
             sys.executable, "-c", _USER_SCRIPT],
            input=json.dumps({"request": request, "learn": learn}),
            capture_output=True, text=True, timeout=120, cwd="/",
        )  # fmt: skip
        if proc.returncode != 0:
            raise AssertionError(f"runner failed: {proc.stderr}")
        result: dict[str, Any] = json.loads(proc.stdout)
        return result
