"""The default seccomp filter, attacked for real from a forked child.

Each attack first succeeds (or at least reaches the kernel) without the filter, then gets
EPERM with it; ordinary work keeps running under the filter.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import shutil
import signal
import struct
import subprocess
import termios
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyseccomp
import pytest

from corral.errors import CorralError
from corral.kernel import mounts, namespaces, privileges, seccomp

pytestmark = pytest.mark.timeout(60)

Runner = Callable[..., Any]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _syscall(name: str, *args: int) -> int:
    number = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    result = _libc.syscall(number, *(ctypes.c_long(a) for a in args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(result)


def _invoke(name: str, *args: int) -> None:
    _syscall(name, *args)


@pytest.fixture(scope="module")
def filtered() -> Callable[[], None]:
    prepared = seccomp.prepare_filter(seccomp.build_default_filter())

    def apply() -> None:
        privileges.set_no_new_privs()
        prepared.apply()

    return apply


def test_mount_is_denied(in_child: Runner, filtered: Callable[[], None], tmp_path: Path) -> None:
    def private_mount_namespace() -> None:
        namespaces.unshare(namespaces.CLONE_NEWNS)
        mounts.mount(None, "/", None, mounts.MS_REC | mounts.MS_PRIVATE)

    mount_tmpfs = lambda: mounts.mount("none", str(tmp_path), "tmpfs", 0)  # noqa: E731
    assert in_child(mount_tmpfs, private_mount_namespace) == "ok"
    assert in_child(mount_tmpfs, private_mount_namespace, filtered) == "EPERM"


def test_new_user_namespace_is_denied(in_child: Runner, filtered: Callable[[], None]) -> None:
    new_userns = lambda: namespaces.unshare(namespaces.CLONE_NEWUSER)  # noqa: E731
    assert in_child(new_userns) == "ok"
    assert in_child(new_userns, filtered) == "EPERM"


def test_clone_with_namespace_flag_is_denied(
    in_child: Runner, filtered: Callable[[], None]
) -> None:
    def clone_into_new_pid_namespace() -> None:
        child = _syscall("clone", namespaces.CLONE_NEWPID | signal.SIGCHLD, 0, 0, 0, 0)
        if child == 0:
            os._exit(0)
        os.waitpid(child, 0)

    assert in_child(clone_into_new_pid_namespace) == "ok"
    assert in_child(clone_into_new_pid_namespace, filtered) == "EPERM"
    assert in_child(lambda: _syscall("clone3", 0, 0), filtered) == "ENOSYS"


@pytest.fixture
def victim() -> Iterator[int]:
    process = subprocess.Popen(["sleep", "30"])
    yield process.pid
    process.kill()
    process.wait()


def test_ptrace_attach_is_denied(
    in_child: Runner, filtered: Callable[[], None], victim: int
) -> None:
    ptrace_attach = 16
    attach = lambda: _invoke("ptrace", ptrace_attach, victim, 0, 0)  # noqa: E731
    assert in_child(attach) == "ok"
    assert in_child(attach, filtered) == "EPERM"


def test_keyctl_is_denied(in_child: Runner, filtered: Callable[[], None]) -> None:
    keyctl_get_keyring_id, key_spec_session_keyring = 0, -3
    keyring = lambda: _invoke("keyctl", keyctl_get_keyring_id, key_spec_session_keyring, 1)  # noqa: E731
    assert in_child(keyring) == "ok"
    assert in_child(keyring, filtered) == "EPERM"


def test_bpf_is_denied(in_child: Runner, filtered: Callable[[], None]) -> None:
    bpf_map_create, bpf_map_type_array = 0, 2
    attr = ctypes.create_string_buffer(struct.pack("<IIII", bpf_map_type_array, 4, 4, 1), 128)
    create_map = lambda: _invoke("bpf", bpf_map_create, ctypes.addressof(attr), 128)  # noqa: E731
    assert in_child(create_map) == "ok"
    assert in_child(create_map, filtered) == "EPERM"


def test_tiocsti_is_denied_even_with_high_bits(
    in_child: Runner, filtered: Callable[[], None]
) -> None:
    leader, follower = os.openpty()
    try:
        char = ctypes.c_char(b"x")
        inject = lambda: fcntl.ioctl(follower, termios.TIOCSTI, b"x") and None  # noqa: E731
        disguised = lambda: _invoke(  # noqa: E731
            "ioctl", follower, (1 << 32) | termios.TIOCSTI, ctypes.addressof(char)
        )
        assert in_child(inject) == "ok"
        assert in_child(disguised) == "ok"
        assert in_child(inject, filtered) == "EPERM"
        assert in_child(disguised, filtered) == "EPERM"
    finally:
        os.close(leader)
        os.close(follower)


def test_io_uring_is_denied(in_child: Runner, filtered: Callable[[], None]) -> None:
    params = ctypes.create_string_buffer(120)
    setup = lambda: os.close(_syscall("io_uring_setup", 1, ctypes.addressof(params)))  # noqa: E731
    baseline = in_child(setup)
    assert baseline in ("ok", "EPERM" if _io_uring_disabled() else "ok")
    assert in_child(setup, filtered) == "EPERM"


def _io_uring_disabled() -> bool:
    try:
        return Path("/proc/sys/kernel/io_uring_disabled").read_text().strip() != "0"
    except OSError:
        return False


def test_personality_change_is_denied(in_child: Runner, filtered: Callable[[], None]) -> None:
    addr_no_randomize = 0x0040000
    change = lambda: _syscall("personality", addr_no_randomize)  # noqa: E731
    assert in_child(change) == 0
    assert in_child(change, filtered) == "EPERM"
    assert in_child(lambda: _syscall("personality", 0), filtered) == 0


_I386_UNSHARE = r"""
#include <stdio.h>
int main(void) {
    long ret;
    /* i386 unshare(CLONE_NEWUSER) through the 32-bit entry point */
    __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(310), "b"(0x10000000) : "memory");
    printf("%ld\n", ret);
    return 0;
}
"""


@pytest.fixture(scope="module")
def i386_unshare(tmp_path_factory: pytest.TempPathFactory) -> str:
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed; the i386 bypass test compiles a tiny C program")
    folder = tmp_path_factory.mktemp("i386")
    source, binary = folder / "unshare.c", folder / "unshare"
    source.write_text(_I386_UNSHARE)
    subprocess.run(["gcc", "-O0", "-o", str(binary), str(source)], check=True)
    return str(binary)


def test_i386_entry_point_cannot_bypass(
    in_child: Runner, filtered: Callable[[], None], i386_unshare: str
) -> None:
    def run() -> Any:
        result = subprocess.run([i386_unshare], capture_output=True, text=True, timeout=10)
        return [result.returncode, result.stdout.strip()]

    baseline = in_child(run)
    if baseline != [0, "0"]:
        pytest.skip(f"this kernel has no working i386 entry point ({baseline})")
    assert in_child(run, filtered) == [-signal.SIGSYS, ""]


def test_x32_syscall_numbers_kill_the_process() -> None:
    """x32 syscalls arrive with the x86_64 audit arch and bit 30 set in the number; the filter
    must treat them as a foreign ABI rather than let them past rules written for x86_64."""
    if pyseccomp.system_arch() != pyseccomp.Arch.X86_64:
        pytest.skip("x32 exists only next to x86_64")
    bpf = seccomp.build_default_filter()
    x32_unshare = 0x40000000 | 272
    pid = os.fork()
    if pid == 0:
        try:
            privileges.set_no_new_privs()
            seccomp.load_filter(bpf)
            _libc.syscall(ctypes.c_long(x32_unshare), ctypes.c_long(namespaces.CLONE_NEWUSER))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


def test_ordinary_work_still_runs(
    in_child: Runner, filtered: Callable[[], None], tmp_path: Path
) -> None:
    def workload() -> Any:
        child = os.fork()
        if child == 0:
            os._exit(7)
        _, status = os.waitpid(child, 0)
        results: list[int] = []
        worker = threading.Thread(target=lambda: results.append(42))
        worker.start()
        worker.join()
        target = tmp_path / "data"
        target.write_text("hello")
        true = subprocess.run(["/bin/true"], timeout=10).returncode
        shell = subprocess.run(["/bin/sh", "-c", "echo $((1+2))"], capture_output=True, text=True)
        return [os.waitstatus_to_exitcode(status), results, target.read_text(), true, shell.stdout]

    expected = [7, [42], "hello", 0, "3\n"]
    assert in_child(workload) == expected
    assert in_child(workload, filtered) == expected


def test_description_names_the_blocked_calls() -> None:
    described = seccomp.describe_default_filter()
    for name in ("ptrace", "mount", "unshare", "bpf", "io_uring_setup", "ioctl(TIOCSTI)"):
        assert name in described


def test_garbage_program_is_refused() -> None:
    with pytest.raises(CorralError):
        seccomp.prepare_filter(b"\x00" * 7)
