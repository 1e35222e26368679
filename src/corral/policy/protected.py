"""Protected persistence files: what a host later executes stays read-only, even inside a
read-write grant.

A workload with write access to a repository or a home directory could otherwise plant code
that runs outside the sandbox: a git hook, a ``core.fsmonitor`` command in ``.git/config``, a
line in ``.bashrc``, an editor task that runs on folder open, a binary in a folder on PATH.
These are protected by name; ordinary sources a user runs deliberately (a Makefile,
``package.json`` scripts, tests) are not, or a coding agent could not do its job.

The search is bounded: each read-write root and its sub-directories down to
``SEARCH_DEPTH`` levels (a home directory's projects, a workspace's repositories), at most
``SEARCH_CAP`` directories, never following symlinked directories.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

# Relative to a directory that is searched; ``*`` matches one name component (dots too).
DEFAULT_PROTECTED: tuple[str, ...] = (
    # git runs these on ordinary commands (commit, checkout, status with fsmonitor)
    ".git/hooks",
    ".git/config",
    ".git/modules/*/hooks",  # a submodule's own git directory
    ".git/modules/*/config",
    ".gitconfig",
    ".config/git",
    # shells read these at start-up
    ".bashrc",
    ".bash_profile",
    ".bash_login",
    ".profile",
    ".bash_logout",
    ".zshrc",
    ".zshenv",
    ".zprofile",
    ".zlogin",
    ".zlogout",
    ".config/fish",
    ".pam_environment",
    # run on entering a directory or opening a folder in an editor
    ".envrc",
    ".direnv",
    ".vscode/tasks.json",
    ".vscode/settings.json",
    ".vscode/launch.json",
    ".idea",
    # login and desktop start-up, ssh
    ".ssh",
    ".config/autostart",
    ".config/systemd",
    # folders that end up on PATH
    ".bin",
    ".local/bin",
    "node_modules/.bin",
    ".venv/bin",
    "venv/bin",
)
SEARCH_DEPTH = 2
SEARCH_CAP = 4096
# Never searched below: their contents are protected wholesale, or are dependency trees that
# are large and are not where a host looks for these names.
_NOT_DESCENDED = frozenset({".git", "node_modules", ".venv", "venv", ".direnv", ".idea"})

Placeholder = Literal["dir", "file"]


@dataclass(frozen=True)
class ProtectedPath:
    """A path the backend must mount read-only (or, when ``placeholder`` is set, create empty
    on the host first and then mount read-only, so the workload cannot create it)."""

    path: str  # absolute
    pattern: str  # the name that matched, e.g. ".git/hooks", or the absolute extra path
    root: str  # the read-write root it lies in
    exists: bool
    placeholder: Placeholder | None = None


def protected_paths(
    readwrite_roots: Sequence[str],
    *,
    extra: Sequence[str] = (),
    relax: Sequence[str] = (),
) -> list[ProtectedPath]:
    """The protected paths inside ``readwrite_roots``.

    ``extra`` adds names/globs (relative, searched like the defaults) or absolute paths.
    ``relax`` lifts built-in names (``".venv/bin"``) or absolute paths (that path and everything
    under it); it never lifts an ``extra`` entry. Callers pass the admin-clamped request's
    ``corral.protectedPaths``, in which a request's relax survives only if the admin allows it.
    """
    relaxed_names = {r for r in relax if not os.path.isabs(r)}
    relaxed_paths = [os.path.realpath(r) for r in relax if os.path.isabs(r)]
    patterns = [(p, True) for p in DEFAULT_PROTECTED if p not in relaxed_names]
    patterns += [(p, False) for p in extra if not os.path.isabs(p)]
    found: dict[str, ProtectedPath] = {}
    roots = [os.path.realpath(r) for r in readwrite_roots]
    for root in roots:
        if not os.path.isdir(root):
            continue
        for base in _search_dirs(root):
            for pattern, relaxable in patterns:
                for match in _matches(root, base, pattern):
                    if relaxable and any(_within(match.path, r) for r in relaxed_paths):
                        continue
                    found.setdefault(match.path, match)
    for path in (p for p in extra if os.path.isabs(p)):
        real = os.path.realpath(path)
        owner = next((r for r in roots if _within(real, r)), None)
        if owner is not None and os.path.lexists(real):
            found.setdefault(real, ProtectedPath(real, path, owner, exists=True))
    return sorted(found.values(), key=lambda p: p.path)


def _search_dirs(root: str) -> Iterator[str]:
    """``root`` and its real sub-directories, breadth first, bounded by depth and count."""
    level, seen = [root], 0
    for depth in range(SEARCH_DEPTH + 1):
        following: list[str] = []
        for directory in level:
            yield directory
            seen += 1
            if seen >= SEARCH_CAP:
                return
            if depth < SEARCH_DEPTH:
                following.extend(_subdirs(directory))
        level = following


def _subdirs(directory: str) -> list[str]:
    try:
        with os.scandir(directory) as entries:
            return sorted(
                e.path
                for e in entries
                if e.name not in _NOT_DESCENDED and e.is_dir(follow_symlinks=False)
            )
    except OSError:
        return []  # unreadable to the caller: nothing there the caller could grant either


def _matches(root: str, base: str, pattern: str) -> Iterator[ProtectedPath]:
    """Existing paths under ``base`` matching ``pattern``; plus a placeholder for
    ``.git/hooks`` in a repository that has none (git would run one created later)."""
    parts = pattern.split("/")
    candidates = [base]
    for part in parts:
        if any(c in part for c in "*?["):
            candidates = [
                os.path.join(c, name)
                for c in candidates
                if os.path.isdir(c)
                for name in _listdir(c)
                if fnmatch.fnmatchcase(name, part)
            ]
        else:
            candidates = [os.path.join(c, part) for c in candidates]
    for path in candidates:
        if os.path.lexists(path):
            yield ProtectedPath(path, pattern, root, exists=True)
        elif pattern.endswith("/hooks") and os.path.isdir(os.path.dirname(path)):
            yield ProtectedPath(path, pattern, root, exists=False, placeholder="dir")


def _listdir(directory: str) -> list[str]:
    try:
        return sorted(os.listdir(directory))
    except OSError:
        return []


def _within(path: str, root: str) -> bool:
    return path == root or root == "/" or path.startswith(root.rstrip("/") + "/")
