"""Filesystem policy resolution: requested paths -> an ordered, alias-tightened tree.

Rules (MXC's, made precise): paths are made absolute and resolved (symlinks followed), the
most specific path wins, and one object reached through several requested paths (a symlink, a
bind mount, a hard link) takes the most restrictive intent: deny > read-only > read-write.
A requested path that does not exist is a warning, not an error.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from corral.contract.model import FilesystemSpec
from corral.errors import ErrorCode, PolicyError

Access = Literal["ro", "rw", "deny"]
_STRICTNESS: dict[Access, int] = {"rw": 0, "ro": 1, "deny": 2}


@dataclass(frozen=True)
class PathEntry:
    path: str  # absolute, symlink-free
    access: Access
    requested: str  # as written in the request
    is_dir: bool
    origin: str = "request"  # "request" | "baseline" | "admin" | "protected"


@dataclass(frozen=True)
class FilesystemPolicy:
    entries: tuple[PathEntry, ...]  # parents before children
    warnings: tuple[str, ...]

    def access_of(self, path: str) -> Access | None:
        """The access the most specific entry gives ``path``; None if nothing covers it."""
        best: PathEntry | None = None
        for entry in self.entries:
            if is_within(path, entry.path) and (best is None or len(entry.path) > len(best.path)):
                best = entry
        return best.access if best else None


def is_within(path: str, root: str) -> bool:
    return path == root or root == "/" or path.startswith(root.rstrip("/") + "/")


def resolve_filesystem(
    spec: FilesystemSpec, *, extra: Iterable[tuple[str, Access, str]] = ()
) -> FilesystemPolicy:
    """Resolve ``spec`` (plus ``extra`` (path, access, origin) entries) into a FilesystemPolicy."""
    requested: list[tuple[str, Access, str]] = [
        *((p, "ro", "request") for p in spec.readonly_paths),
        *((p, "rw", "request") for p in spec.readwrite_paths),
        *((p, "deny", "request") for p in spec.denied_paths),
        *extra,
    ]
    warnings: list[str] = []
    by_path: dict[str, PathEntry] = {}
    by_inode: dict[tuple[int, int], list[str]] = {}
    for raw, access, origin in requested:
        if not os.path.isabs(raw):
            raise PolicyError(
                f"filesystem path {raw!r} is not absolute",
                code=ErrorCode.POLICY_VALIDATION,
                details={"path": raw},
                remediation="write every filesystem path as an absolute path",
            )
        real = os.path.realpath(raw)
        try:
            st = os.stat(real)
        except FileNotFoundError:
            warnings.append(f"{raw}: path does not exist; the {_NAMES[access]} entry is ignored")
            continue
        except PermissionError as exc:
            raise PolicyError(
                f"filesystem path {raw!r} is not accessible to the calling user: {exc.strerror}",
                details={"path": raw},
                remediation="grants are bounded by what the calling user can access",
            ) from exc
        if access != "deny":
            _check_caller_access(raw, real, access)
        entry = PathEntry(real, access, raw, stat.S_ISDIR(st.st_mode), origin)
        previous = by_path.get(real)
        if previous is None or _STRICTNESS[access] > _STRICTNESS[previous.access]:
            by_path[real] = entry
        by_inode.setdefault((st.st_dev, st.st_ino), []).append(real)

    # Aliases of one object (symlink/bind mount/hard link named twice) tighten to the strictest.
    for paths in by_inode.values():
        if len(set(paths)) > 1:
            strictest = max((by_path[p].access for p in paths), key=_STRICTNESS.__getitem__)
            for p in paths:
                if by_path[p].access != strictest:
                    by_path[p] = _with_access(by_path[p], strictest)
                    warnings.append(
                        f"{p}: same object as another entry; tightened to {_NAMES[strictest]}"
                    )

    _tighten_hard_links(by_path, warnings)
    entries = tuple(sorted(by_path.values(), key=lambda e: (e.path.count("/"), e.path)))
    return FilesystemPolicy(entries, tuple(warnings))


_NAMES: dict[Access, str] = {"ro": "read-only", "rw": "read-write", "deny": "denied"}


def _with_access(entry: PathEntry, access: Access) -> PathEntry:
    return PathEntry(entry.path, access, entry.requested, entry.is_dir, entry.origin)


def _check_caller_access(raw: str, real: str, access: Access) -> None:
    mode = os.R_OK | (os.W_OK if access == "rw" else 0)
    if not os.access(real, mode, effective_ids=True):
        raise PolicyError(
            f"cannot grant {_NAMES[access]} access to {raw!r}: the calling user lacks it",
            details={"path": raw},
            remediation="grants are bounded by what the calling user can access",
        )


def _tighten_hard_links(by_path: dict[str, PathEntry], warnings: list[str]) -> None:
    """A denied or read-only regular file with other hard links must not be reachable more
    loosely through a link inside a grant: add the links found in granted trees as entries."""
    targets: dict[tuple[int, int], PathEntry] = {}
    for entry in by_path.values():
        if entry.access == "rw" or entry.is_dir:
            continue
        st = os.stat(entry.path)
        if st.st_nlink > 1:
            targets[(st.st_dev, st.st_ino)] = entry
    if not targets:
        return
    grants = [e for e in by_path.values() if e.is_dir and e.access != "deny"]
    for grant in grants:
        for path in _walk_files(grant.path, limit=200_000):
            try:
                st = os.lstat(path)
            except OSError:
                continue
            target = targets.get((st.st_dev, st.st_ino))
            if target is None or path == target.path:
                continue
            current = by_path.get(path)
            if current is None or _STRICTNESS[current.access] < _STRICTNESS[target.access]:
                by_path[path] = PathEntry(path, target.access, target.requested, False, "alias")
                warnings.append(f"{path}: hard link to {target.path}; {_NAMES[target.access]} too")


def _walk_files(root: str, *, limit: int) -> Sequence[str]:
    found: list[str] = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            found.append(os.path.join(dirpath, name))
            if len(found) >= limit:
                return found
    return found
