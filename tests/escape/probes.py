"""Attack probes, run both on the host (to prove each attack works there) and inside a
sandbox (where it must fail). Runs under Debian's /usr/bin/python3 with the stdlib only.

Usage: python3 probes.py ATTACK [ARGS...]; prints "OK <detail>" or "DENIED <errno name>".
"""

import ctypes
import errno
import fcntl
import os
import socket
import sys
import termios

libc = ctypes.CDLL(None, use_errno=True)


def check(result):
    if result == -1 or (result is not None and result < 0):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def read_file(path):
    with open(path, "rb") as f:
        return f"{len(f.read())} bytes"


def write_file(path):
    with open(path, "a") as f:
        f.write("pwned\n")
    return "written"


def rename(src, dst):
    os.rename(src, dst)
    return "renamed"


def link(src, dst):
    os.link(src, dst)
    return read_file(dst)


def symlink_read(target, link_path):
    os.symlink(target, link_path)
    return read_file(link_path)


def ptrace(pid):
    check(libc.ptrace(16, int(pid), 0, 0))  # PTRACE_ATTACH
    libc.ptrace(17, int(pid), 0, 0)  # PTRACE_DETACH
    return "attached"


def signal(pid):
    os.kill(int(pid), 0)
    return "signalled"


def mount(target):
    check(libc.mount(b"none", target.encode(), b"tmpfs", 0, None))
    libc.umount2(target.encode(), 2)
    return "mounted"


def unshare_user():
    check(libc.unshare(0x10000000))
    return "new user namespace"


def unshare_mount():
    check(libc.unshare(0x00020000))
    return "new mount namespace"


def pivot_root():
    # Deliberately invalid arguments: the kernel answers EINVAL/EBUSY if the call reaches it
    # (so the host is never pivoted), seccomp answers EPERM.
    check(libc.syscall(155, b"/", b"/"))
    return "pivoted"


def keyctl():
    check(libc.syscall(248, b"user", b"corral-probe", b"x", 1, -2))  # add_key to session ring
    return "key added"


def bpf():
    attr = ctypes.create_string_buffer(128)
    check(libc.syscall(321, 0, attr, 128))  # BPF_MAP_CREATE with zeros: EINVAL if allowed
    return "bpf reachable"


def tiocsti():
    _master, slave = os.openpty()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
            fcntl.ioctl(slave, termios.TIOCSTI, b"x")
            os._exit(0)
        except OSError as exc:
            os._exit(exc.errno)
    _, status = os.waitpid(pid, 0)
    code = os.WEXITSTATUS(status)
    if code:
        raise OSError(code, os.strerror(code))
    return "injected a keystroke"


def connect_unix(path):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
    return "connected"


def connect_abstract(name):
    return connect_unix("\0" + name)


def connect_tcp(host, port):
    with socket.create_connection((host, int(port)), timeout=2):
        return "connected"


def see_pid(pid):
    if not os.path.exists(f"/proc/{pid}"):
        raise OSError(errno.ENOENT, "no such process visible")
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().replace(b"\0", b" ").decode()[:60]


def sethostname(name):
    check(libc.sethostname(name.encode(), len(name)))
    return "hostname changed"


def leaked_fds():
    found = []
    for fd in range(3, 256):
        try:
            os.fstat(fd)
            found.append(str(fd))
        except OSError:
            pass
    if not found:
        raise OSError(errno.EBADF, "no inherited descriptors")
    return "open fds: " + ",".join(found)


def read_fd(fd):
    return f"{len(os.read(int(fd), 100))} bytes via fd"


def fork_bomb(count):
    pids = []
    try:
        for _ in range(int(count)):
            pid = os.fork()
            if pid == 0:
                import time

                time.sleep(5)
                os._exit(0)
            pids.append(pid)
    finally:
        for pid in pids:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
    return f"forked {len(pids)}"


def allocate(mib):
    chunks = [bytearray(1024 * 1024) for _ in range(int(mib))]
    for c in chunks:
        c[::4096] = b"x" * len(c[::4096])
    return f"allocated {len(chunks)} MiB"


def main():
    attack, *args = sys.argv[1:]
    try:
        detail = globals()[attack](*args)
        print(f"OK {detail}")
    except OSError as exc:
        print(f"DENIED {errno.errorcode.get(exc.errno, exc.errno)} {exc.strerror}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
