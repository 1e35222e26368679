"""The escape suite's filesystem and network attacks (tests/escape/), through the whole SDK
path with ``containment: "microvm"``: each attack first runs on the host, where it must work,
then inside a micro-VM, where it must fail. The probes are busybox sh commands run by the host's
static busybox, which the guest sees through its read-only share of /usr."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from microvm_support import greeting

import corral

pytestmark = [
    pytest.mark.vm,
    pytest.mark.timeout(300),
    pytest.mark.skipif(os.geteuid() != 0, reason="the micro-VM backend runs as root"),
]

SECRET = "s3cr3t-token"
BUSYBOX = "/bin/busybox"


class Scene:
    """A workspace (read-write), a project (read-only) and a secret outside every grant."""

    def __init__(self, base: Path) -> None:
        self.workspace = base / "workspace"
        self.project = base / "project"
        self.secrets = base / "secrets"
        for d in (self.workspace, self.project, self.secrets):
            d.mkdir()
        (self.project / "code.sh").write_text("echo hi\n")
        self.secret = self.secrets / "token"
        self.secret.write_text(SECRET + "\n")

    def outside(self, script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [BUSYBOX, "sh", "-c", script], capture_output=True, text=True, timeout=60
        )

    def inside(self, script: str, **extra: Any) -> corral.ExecutionResult:
        request: dict[str, Any] = {
            "version": "1.1.0-alpha",
            "containment": "microvm",
            "process": {"commandLine": f"{BUSYBOX} sh -c {shlex.quote(script)}", "timeout": 60000},
            "filesystem": {
                "readonlyPaths": [str(self.project)],
                "readwritePaths": [str(self.workspace)],
            },
            **extra,
        }
        return corral.run(request, experimental=True)


@pytest.fixture
def scene(tmp_path: Path) -> Scene:
    return Scene(tmp_path)


def assert_read_blocked(scene: Scene, script: str) -> None:
    outside = scene.outside(script)
    assert SECRET in outside.stdout, f"the attack does not work even outside: {outside}"
    inside = scene.inside(script)
    assert SECRET not in inside.stdout + inside.stderr, inside
    assert inside.exit_code != 0, inside


class TestFilesystem:
    def test_read_secret_by_path(self, scene: Scene) -> None:
        assert_read_blocked(scene, f"cat {scene.secret}")

    def test_read_secret_via_dotdot(self, scene: Scene) -> None:
        assert_read_blocked(scene, f"cat {scene.workspace}/../secrets/token")

    def test_read_secret_via_planted_symlink(self, scene: Scene) -> None:
        link = scene.workspace / "link-to-secret"
        assert_read_blocked(scene, f"ln -sf {scene.secret} {link} && cat {link}")

    def test_read_secret_via_proc_self_root(self, scene: Scene) -> None:
        assert_read_blocked(scene, f"cat /proc/self/root{scene.secret}")

    def test_read_secret_via_proc_1_root(self, scene: Scene) -> None:
        # Outside, /proc/self/root is the host's root; inside, PID 1 is the guest agent, whose
        # root is the initramfs: still no host file.
        outside = scene.outside(f"cat /proc/self/root{scene.secret}")
        assert SECRET in outside.stdout
        inside = scene.inside(f"cat /proc/1/root{scene.secret}")
        assert SECRET not in inside.stdout and inside.exit_code != 0, inside

    def test_write_into_read_only_grant(self, scene: Scene) -> None:
        target = scene.project / "code.sh"
        script = f"echo pwned >> {target}"
        inside = scene.inside(script)
        assert inside.exit_code != 0, inside
        assert target.read_text() == "echo hi\n"
        assert scene.outside(script).returncode == 0  # the attack works outside
        assert target.read_text().endswith("pwned\n")

    def test_write_outside_every_grant(self, scene: Scene) -> None:
        target = "/usr/corral-vm-pwned"
        inside = scene.inside(f"echo pwned > {target}")
        assert inside.exit_code != 0, inside
        assert not os.path.exists(target)
        try:
            assert scene.outside(f"echo pwned > {target}").returncode == 0
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(target)

    def test_rename_out_of_read_only_grant(self, scene: Scene) -> None:
        source, target = scene.project / "code.sh", scene.workspace / "code.sh"
        inside = scene.inside(f"mv {source} {target}")
        # rename(2) fails (EXDEV, then EROFS): busybox mv falls back to copy and unlink; the copy
        # is allowed (the guest may read the grant), removing the source is not.
        assert inside.exit_code != 0, inside
        assert source.read_text() == "echo hi\n"
        target.unlink(missing_ok=True)
        assert scene.outside(f"mv {source} {target}").returncode == 0
        assert target.exists() and not source.exists()

    def test_workspace_write_works(self, scene: Scene) -> None:
        """The control: the same kind of write where it is granted."""
        inside = scene.inside(f"echo written > {scene.workspace}/out.txt")
        assert inside.exit_code == 0, inside
        assert (scene.workspace / "out.txt").read_text() == "written\n"


@pytest.fixture
def loopback_server() -> Iterator[int]:
    server = socket.create_server(("127.0.0.1", 0))
    with greeting(server):
        yield server.getsockname()[1]


class TestSockets:
    @pytest.mark.parametrize("address", ["127.0.0.1", "10.0.2.2"])
    def test_host_loopback_tcp(self, scene: Scene, loopback_server: int, address: str) -> None:
        script = f"busybox nc -w 3 {address} {loopback_server} </dev/null"
        assert (
            "hello-from-host"
            in scene.outside(f"busybox nc -w 3 127.0.0.1 {loopback_server}").stdout
        )
        inside = scene.inside(script)
        assert "hello-from-host" not in inside.stdout, inside
        assert inside.exit_code != 0, inside

    def test_host_loopback_with_egress_open_but_loopback_denied(
        self, scene: Scene, loopback_server: int
    ) -> None:
        """A NIC and an open egress default still do not open the host's loopback."""
        network = {"egress": {"default": "allow"}, "ingress": {"hostLoopback": "deny"}}
        inside = scene.inside(f"busybox nc -w 3 10.0.2.2 {loopback_server}", network=network)
        assert "hello-from-host" not in inside.stdout, inside

    def test_host_unix_socket(self, scene: Scene) -> None:
        """A host socket even inside a read-write grant: over 9p the guest sees a socket file,
        but connecting to it can never reach the host's listener."""
        socat = shutil.which("socat")
        if socat is None:
            pytest.skip("socat is needed to connect to a unix socket from a shell")
        path = scene.workspace / "agent.sock"
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(str(path))
        server.listen(8)
        os.chmod(path, 0o777)
        with greeting(server):
            script = f"{socat} -T3 - UNIX-CONNECT:{path} </dev/null"
            assert "hello-from-host" in scene.outside(script).stdout
            inside = scene.inside(script)
            assert "hello-from-host" not in inside.stdout, inside
            assert inside.exit_code != 0, inside
