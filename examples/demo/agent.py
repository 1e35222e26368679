"""An agent-style tool run, executed INSIDE a Corral sandbox by Debian's /usr/bin/python3.

It does what a coding agent does (read the project, edit a file in its workspace) and what a
compromised or confused one might try (read a secret, write into the project, reach the
network, debug another process, mount), and reports each outcome as ALLOWED or DENIED.
"""

import ctypes
import json
import os
import socket
import sys

project, workspace, secret, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
results = []


def attempt(label, action):
    try:
        detail = action()
        results.append((label, "ALLOWED", detail or ""))
    except OSError as exc:
        results.append((label, "DENIED", f"{type(exc).__name__}: {exc.strerror or exc}"))


def list_project():
    return ", ".join(sorted(os.listdir(project)))


def edit_workspace():
    path = os.path.join(workspace, "notes.md")
    with open(path, "a") as f:
        f.write("- summarised the project\n")
    return f"{path} now {os.path.getsize(path)} bytes"


def read_secret():
    with open(secret) as f:
        return f"read {len(f.read())} bytes of the secret!"


def write_project():
    with open(os.path.join(project, "README.md"), "a") as f:
        f.write("tampered\n")


def reach_network():
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        return s.recv(100).decode(errors="replace").splitlines()[0]


def ptrace_parent():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(16, 1, 0, 0) != 0:  # PTRACE_ATTACH to the sandbox's init
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return "attached"


def mount_tmpfs():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return "mounted"


attempt("list the project (read-only grant)", list_project)
attempt("edit notes in the workspace (read-write grant)", edit_workspace)
attempt("read ~/.ssh/id_ed25519 (denied path)", read_secret)
attempt("write into the project (read-only grant)", write_project)
attempt(f"connect to a host service on 127.0.0.1:{port}", reach_network)
attempt("ptrace another process", ptrace_parent)
attempt("mount a filesystem", mount_tmpfs)
print(json.dumps(results))
