"""Ready-made filesystem policy fragments for common agent needs, to merge into a request:

request["filesystem"] = merge(tools_policy(), temporary_files_policy(), user_profile_policy())
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, Sequence

Fragment = dict[str, list[str]]

# Credentials and agents' sockets that a profile grant must never expose.
SENSITIVE_PROFILE_ENTRIES = (
    ".ssh", ".gnupg", ".aws", ".azure", ".kube", ".docker", ".netrc", ".pgpass",
    ".password-store", ".git-credentials", ".npmrc", ".pypirc", ".vault-token",
    ".config/gcloud", ".config/gh", ".local/share/keyrings", ".mozilla", ".config/chromium",
    ".config/google-chrome", ".bash_history", ".zsh_history", ".python_history",
)  # fmt: skip


def tools_policy(path: str | None = None) -> Fragment:
    """Read-only access to every existing directory on PATH (default: this process's)."""
    dirs: list[str] = []
    for entry in (path if path is not None else os.environ.get("PATH", "")).split(os.pathsep):
        if entry and os.path.isabs(entry) and os.path.isdir(entry) and entry not in dirs:
            dirs.append(entry)
    return {"readonlyPaths": dirs}


def temporary_files_policy(directory: str | None = None) -> Fragment:
    """Read-write access to a fresh private scratch directory (created 0700), never to the
    shared /tmp: the sandbox has its own /tmp already; this one survives the run."""
    scratch = directory or tempfile.mkdtemp(prefix="corral-scratch-")
    os.makedirs(scratch, mode=0o700, exist_ok=True)
    return {"readwritePaths": [scratch]}


def user_profile_policy(home: str | None = None) -> Fragment:
    """Read-only access to the user's home (dotfiles, tool configuration), with credentials,
    keyrings and shell histories denied."""
    home = home or os.path.expanduser("~")
    denied = [os.path.join(home, e) for e in SENSITIVE_PROFILE_ENTRIES]
    return {"readonlyPaths": [home], "deniedPaths": [p for p in denied if os.path.lexists(p)]}


def merge(*fragments: Mapping[str, Sequence[str]]) -> Fragment:
    """One filesystem section from several fragments (order kept, duplicates dropped)."""
    out: Fragment = {}
    for fragment in fragments:
        for key, paths in fragment.items():
            bucket = out.setdefault(key, [])
            bucket.extend(p for p in paths if p not in bucket)
    return out
