"""The escape suite: a process inside a process sandbox attacks the host, for real.

Every test first runs the same attack on the host as the same user (it must work there, or
the test would prove nothing), then inside the sandbox, where it must fail. Parametrised to
run as root and as an unprivileged user (fixture ``runner``).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import threading
from typing import Any

import pytest
from tests.conftest import Runner

PROBES = os.path.join(os.path.dirname(__file__), "probes.py")
PY = "/usr/bin/python3"


class Scene:
    """A workspace (read-write), a project (read-only) and a secret outside every grant."""

    def __init__(self, runner: Runner, area: str) -> None:
        self.runner = runner
        self.tools = runner.make_dir(area, "tools")
        shutil.copy(PROBES, self.tools)
        os.chmod(os.path.join(self.tools, "probes.py"), 0o644)
        self.workspace = runner.make_dir(area, "workspace")
        self.project = runner.make_dir(area, "project")
        runner.write(os.path.join(self.project, "code.py"), "print('hi')\n")
        secrets_dir = runner.make_dir(area, "secrets")
        self.secret = runner.write(os.path.join(secrets_dir, "token"), "s3cr3t\n")

    def command(self, attack: str, *args: object) -> str:
        argv = [PY, os.path.join(self.tools, "probes.py"), attack, *map(str, args)]
        return shlex.join(argv)

    def outside(self, attack: str, *args: object) -> str:
        cmd = ["setpriv", f"--reuid={self.runner.uid}", f"--regid={self.runner.gid}",
               "--clear-groups", "/bin/sh", "-c", self.command(attack, *args)]  # fmt: skip
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout.strip()

    def inside(self, attack: str, *args: object, **extra: Any) -> str:
        fs = extra.pop("filesystem", None) or {
            "readonlyPaths": [self.tools, self.project],
            "readwritePaths": [self.workspace],
        }
        request: dict[str, Any] = {
            "process": {"commandLine": self.command(attack, *args), "timeout": 60000},
            "filesystem": fs,
            **extra,
        }
        result = self.runner.run(request)
        assert result.exit_code == 0, result.stderr
        return result.stdout.strip()


@pytest.fixture
def scene(runner: Runner, area: str) -> Scene:
    return Scene(runner, area)


def assert_blocked(scene: Scene, attack: str, *args: object, **extra: Any) -> str:
    outside = scene.outside(attack, *args)
    assert outside.startswith("OK"), f"attack {attack} does not work even outside: {outside}"
    inside = scene.inside(attack, *args, **extra)
    assert inside.startswith("DENIED"), f"attack {attack} worked inside the sandbox: {inside}"
    return inside


@pytest.mark.timeout(120)
class TestFilesystem:
    def test_read_secret_by_path(self, scene: Scene) -> None:
        assert_blocked(scene, "read_file", scene.secret)

    def test_read_secret_via_dotdot(self, scene: Scene) -> None:
        assert_blocked(scene, "read_file", f"{scene.workspace}/../secrets/token")

    def test_read_secret_via_planted_symlink(self, scene: Scene) -> None:
        link = os.path.join(scene.workspace, "link-to-secret")
        assert_blocked(scene, "symlink_read", scene.secret, link)

    def test_read_secret_via_hard_link(self, scene: Scene) -> None:
        # A hard link planted (by an earlier run, or by anyone) inside a granted tree to a
        # denied file must not open the file: the planner tightens the alias to denied.
        os.link(scene.secret, os.path.join(scene.workspace, "hardlink"))
        fs = {"readwritePaths": [scene.workspace], "readonlyPaths": [scene.tools],
              "deniedPaths": [scene.secret]}  # fmt: skip
        assert_blocked(scene, "read_file", f"{scene.workspace}/hardlink", filesystem=fs)

    def test_new_hard_link_to_outside_file_fails(self, scene: Scene) -> None:
        assert_blocked(scene, "link", scene.secret, f"{scene.workspace}/stolen")

    @pytest.mark.parametrize("via", ["/proc/self/root", "/proc/1/root"])
    def test_read_secret_via_proc_root(self, scene: Scene, via: str) -> None:
        # Outside, /proc/self/root is the host root (host PID 1 may be beyond our ptrace
        # reach); inside, both name the sandbox's own root.
        outside = scene.outside("read_file", f"/proc/self/root{scene.secret}")
        assert outside.startswith("OK"), outside
        inside = scene.inside("read_file", f"{via}{scene.secret}")
        assert inside.startswith("DENIED"), inside

    def test_leaked_descriptor(self, scene: Scene) -> None:
        fd = os.open(scene.secret, os.O_RDONLY)
        os.set_inheritable(fd, True)
        try:
            inside = scene.inside("read_fd", fd)
            assert inside.startswith("DENIED"), inside
            assert scene.inside("leaked_fds").startswith("DENIED")
        finally:
            os.close(fd)

    def test_write_outside(self, scene: Scene) -> None:
        assert_blocked(scene, "write_file", f"{scene.project}/code.py")
        if scene.runner.uid == 0:
            try:
                assert_blocked(scene, "write_file", "/usr/corral-pwned")
            finally:
                os.unlink("/usr/corral-pwned")
        else:
            inside = scene.inside("write_file", "/usr/corral-pwned")
            assert inside.startswith("DENIED"), inside

    def test_rename_out_of_readonly_grant(self, scene: Scene) -> None:
        source, target = f"{scene.project}/code.py", f"{scene.workspace}/code.py"
        assert scene.outside("rename", source, target).startswith("OK")
        os.rename(target, source)  # put it back for the attack inside
        inside = scene.inside("rename", source, target)
        assert inside.startswith("DENIED"), inside
        assert os.path.exists(source) and not os.path.exists(target)

    def test_denied_path_inside_grant_visible_but_inaccessible(self, scene: Scene) -> None:
        secret_dir = scene.runner.make_dir(scene.workspace, "private")
        scene.runner.write(f"{secret_dir}/key", "k\n")
        fs = {"readwritePaths": [scene.workspace], "readonlyPaths": [scene.tools],
              "deniedPaths": [secret_dir]}  # fmt: skip
        inside = scene.inside("read_file", f"{secret_dir}/key", filesystem=fs)
        assert inside.startswith("DENIED"), inside
        listing = scene.runner.run(
            {"process": {"commandLine": f"ls {scene.workspace}"}, "filesystem": fs}
        )
        assert "private" in listing.stdout.split()

    def test_workspace_write_works(self, scene: Scene) -> None:
        inside = scene.inside("write_file", f"{scene.workspace}/out.txt")
        assert inside.startswith("OK"), inside
        with open(f"{scene.workspace}/out.txt") as f:
            assert f.read() == "pwned\n"


@pytest.mark.timeout(120)
class TestProcessesAndKernel:
    def test_ptrace_host_process(self, scene: Scene) -> None:
        victim = subprocess.Popen(
            [
                "setpriv",
                f"--reuid={scene.runner.uid}",
                f"--regid={scene.runner.gid}",
                "--clear-groups",
                "sleep",
                "60",
            ]
        )
        try:
            assert_blocked(scene, "ptrace", victim.pid)
            assert_blocked(scene, "signal", victim.pid)
            assert_blocked(scene, "see_pid", victim.pid)
        finally:
            victim.kill()
            victim.wait()

    @pytest.mark.parametrize("attack", ["unshare_user", "keyctl"])
    def test_kernel_escape_primitives(self, scene: Scene, attack: str) -> None:
        assert_blocked(scene, attack)

    @pytest.mark.parametrize("attack", ["mount", "unshare_mount", "pivot_root", "bpf"])
    def test_privileged_primitives(self, scene: Scene, attack: str, area: str) -> None:
        args = [scene.runner.make_dir(area, "mnt")] if attack == "mount" else []
        if scene.runner.uid == 0:
            # Outside, the syscall reaches the kernel (it works, or the kernel itself rejects
            # the deliberately harmless arguments); inside, seccomp answers EPERM first.
            outside = scene.outside(attack, *args)
            assert not outside.startswith("DENIED EPERM"), outside
        inside = scene.inside(attack, *args)
        assert inside.startswith("DENIED EPERM"), inside

    def test_tiocsti_injection(self, scene: Scene) -> None:
        assert_blocked(scene, "tiocsti")

    def test_change_host_hostname(self, scene: Scene) -> None:
        before = socket.gethostname()
        inside = scene.inside("sethostname", "pwned")
        assert inside.startswith("DENIED"), inside
        assert socket.gethostname() == before


@pytest.mark.timeout(120)
class TestSockets:
    def test_host_unix_sockets(self, scene: Scene, area: str) -> None:
        # A host socket outside the grants (ssh-agent, D-Bus, X11 live in such places).
        path = os.path.join(scene.runner.make_dir(area, "run"), "agent.sock")
        name = f"corral-test-{os.getpid()}-{scene.runner.name}"
        servers = []
        for address in (path, "\0" + name):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(address)
            s.listen(8)
            servers.append(s)
        os.chmod(path, 0o777)
        stop = threading.Event()

        def accept_all(sock: socket.socket) -> None:
            sock.settimeout(0.2)
            while not stop.is_set():
                with contextlib.suppress(OSError):
                    sock.accept()[0].close()

        threads = [threading.Thread(target=accept_all, args=(s,), daemon=True) for s in servers]
        for t in threads:
            t.start()
        try:
            assert_blocked(scene, "connect_abstract", name)
            assert_blocked(scene, "connect_unix", path)
        finally:
            stop.set()
            for s in servers:
                s.close()

    def test_host_loopback_tcp(self, scene: Scene) -> None:
        server = socket.create_server(("127.0.0.1", 0))
        port = server.getsockname()[1]
        threading.Thread(target=lambda: server.accept(), daemon=True).start()
        try:
            assert_blocked(scene, "connect_tcp", "127.0.0.1", port)
        finally:
            server.close()


def test_listing_the_root_shows_only_the_policy(scene: Scene) -> None:
    result = scene.runner.run({"process": {"commandLine": "ls /; ls /var/tmp 2>&1; ls /home 2>&1"}})
    names = result.stdout.split()
    assert {"usr", "etc", "tmp", "proc", "dev"} <= set(names)
    assert "home" not in names and "root" not in names and "var" not in names
    assert "No such file or directory" in result.stdout


def test_caller_command_line_is_not_visible(root_runner: Runner) -> None:
    """The caller's argv (which may carry secrets) must not show through the sandbox's
    /proc/1/cmdline: init is Corral's launcher, with descriptor numbers for arguments."""
    with open("/proc/self/cmdline", "rb") as f:  # the attack works on the host
        assert b"pytest" in f.read()
    result = root_runner.run({"process": {"commandLine": "tr '\\0' ' ' < /proc/1/cmdline"}})
    argv = result.stdout.split()
    assert "pytest" not in result.stdout and os.path.basename(argv[0]) == "corral-launch", argv
    assert all(arg.isdigit() for arg in argv[1:]), argv
