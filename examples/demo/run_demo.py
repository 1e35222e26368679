"""Corral's end-to-end demonstration: a real agent-style workload under a deny-by-default
policy, through the SDK and the CLI. Run by `bash scripts/demo.sh`."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading

import corral

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    root = tempfile.mkdtemp(prefix="corral-demo-")
    try:
        return demo(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def demo(root: str) -> int:
    project = os.path.join(root, "project")
    workspace = os.path.join(root, "workspace")
    home = os.path.join(root, "home")
    os.makedirs(os.path.join(project, "src"))
    os.makedirs(workspace)
    os.makedirs(os.path.join(home, ".ssh"))
    for name, text in (("README.md", "# demo\n"), ("src/app.py", "print('hi')\n")):
        with open(os.path.join(project, name), "w") as f:
            f.write(text)
    secret = os.path.join(home, ".ssh", "id_ed25519")
    with open(secret, "w") as f:
        f.write("-----BEGIN OPENSSH PRIVATE KEY----- (demo secret)\n")

    server = http.server.HTTPServer(("127.0.0.1", 0), _Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    shutil.copy(os.path.join(HERE, "agent.py"), workspace)

    request = {
        "version": "1.0.0",
        "process": {
            "commandLine": f"/usr/bin/python3 agent.py {project} {workspace} {secret} {port}",
            "timeout": 30000,
        },
        "filesystem": {
            "readonlyPaths": [project, home],
            "readwritePaths": [workspace],
            "deniedPaths": [os.path.join(home, ".ssh")],
        },
        "network": {"egress": {"default": "deny"}},
    }
    print("== The host can read the secret and reach the service (so denials below are real):")
    with open(secret) as f:
        print(f"   host reads {len(f.read())} bytes of {secret}")
    print(f"   host service answers on 127.0.0.1:{port}")

    print("\n== The plan (corral exec --dry-run):")
    config = os.path.join(root, "request.json")
    with open(config, "w") as f:
        json.dump(request, f, indent=2)
    subprocess.run([sys.executable, "-m", "corral", "exec", "--dry-run", config], check=True)

    print("\n== The agent's run through the SDK (corral.run):")
    result = corral.run(request)
    if result.exit_code != 0:
        print(result.stderr, file=sys.stderr)
        return 1
    outcomes = json.loads(result.stdout)
    for label, verdict, detail in outcomes:
        print(f"   {verdict:8} {label}: {detail}")
    expected = {"ALLOWED": {0, 1}, "DENIED": {2, 3, 4, 5, 6}}
    wrong = [o[0] for i, o in enumerate(outcomes) if i not in expected[o[1]]]

    print("\n== The same run through the CLI (corral exec):")
    cli = subprocess.run(
        [sys.executable, "-m", "corral", "exec", config], capture_output=True, text=True
    )
    print(f"   exit code {cli.returncode}; {len(json.loads(cli.stdout))} checks reported")
    server.shutdown()
    if wrong or cli.returncode != 0:
        print(f"\nUNEXPECTED: {wrong or cli.stderr}", file=sys.stderr)
        return 1
    print("\nAll allowed actions worked; every forbidden one was stopped by the kernel.")
    return 0


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


if __name__ == "__main__":
    sys.exit(main())
