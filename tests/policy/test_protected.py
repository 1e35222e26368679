"""Protected persistence files found in a real tree, and proof that mounting the result
read-only stops a workload from planting them while the rest stays writable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from corral.policy import protected as protected_module
from corral.policy.protected import DEFAULT_PROTECTED, ProtectedPath, protected_paths


def make_tree(root: Path) -> Path:
    """A home directory with a repository, a venv and an ordinary project."""
    home = root / "home"
    repo = home / "src" / "app"
    for directory in (
        repo / ".git" / "hooks",
        repo / ".git" / "modules" / "lib" / "hooks",
        repo / ".venv" / "bin",
        repo / "node_modules" / ".bin",
        repo / ".vscode",
        home / ".ssh",
        home / ".config" / "git",
    ):
        directory.mkdir(parents=True)
    for file in (
        home / ".bashrc",
        home / ".profile",
        home / ".gitconfig",
        repo / ".git" / "config",
        repo / ".git" / "modules" / "lib" / "config",
        repo / ".envrc",
        repo / ".vscode" / "tasks.json",
        repo / ".vscode" / "extensions.json",
        repo / "Makefile",
        repo / "main.py",
    ):
        file.write_text("original\n")
    return home


def paths_of(found: list[ProtectedPath], base: Path) -> set[str]:
    return {os.path.relpath(p.path, base) for p in found}


def test_finds_the_persistence_files_and_nothing_ordinary(tmp_path: Path) -> None:
    home = make_tree(tmp_path)
    found = protected_paths([str(home)])
    assert paths_of(found, home) == {
        ".bashrc",
        ".profile",
        ".gitconfig",
        ".config/git",
        ".ssh",
        "src/app/.git/hooks",
        "src/app/.git/config",
        "src/app/.git/modules/lib/hooks",
        "src/app/.git/modules/lib/config",
        "src/app/.envrc",
        "src/app/.vscode/tasks.json",
        "src/app/.venv/bin",
        "src/app/node_modules/.bin",
    }
    assert all(p.exists and p.placeholder is None and p.root == str(home) for p in found)


def test_a_repository_root_grant(tmp_path: Path) -> None:
    home = make_tree(tmp_path)
    repo = home / "src" / "app"
    found = paths_of(protected_paths([str(repo)]), repo)
    assert ".git/hooks" in found and ".bashrc" not in found


def test_missing_hooks_directory_gets_a_placeholder(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)
    (repo / ".git" / "config").write_text("[core]\n")
    found = {os.path.relpath(p.path, repo): p for p in protected_paths([str(repo)])}
    hooks = found[".git/hooks"]
    assert not hooks.exists and hooks.placeholder == "dir"
    assert found[".git/config"].exists


def test_no_placeholder_without_a_repository(tmp_path: Path) -> None:
    assert protected_paths([str(tmp_path)]) == []


def test_relax_by_name_and_by_path(tmp_path: Path) -> None:
    home = make_tree(tmp_path)
    repo = home / "src" / "app"
    by_name = paths_of(protected_paths([str(home)], relax=[".venv/bin"]), home)
    assert "src/app/.venv/bin" not in by_name and "src/app/.git/hooks" in by_name
    by_path = paths_of(protected_paths([str(home)], relax=[str(repo / ".git")]), home)
    assert not any(p.startswith("src/app/.git/") for p in by_path)
    assert ".bashrc" in by_path


def test_extra_names_and_paths_cannot_be_relaxed(tmp_path: Path) -> None:
    home = make_tree(tmp_path)
    repo = home / "src" / "app"
    found = protected_paths(
        [str(home)],
        extra=["Makefile", str(repo / "main.py"), "/elsewhere/x"],
        relax=["Makefile", str(repo)],
    )
    got = paths_of(found, home)
    assert {"src/app/Makefile", "src/app/main.py"} <= got
    assert "src/app/.git/hooks" not in got  # the default under the relaxed path is lifted


def test_overlapping_roots_are_reported_once(tmp_path: Path) -> None:
    home = make_tree(tmp_path)
    found = protected_paths([str(home), str(home / "src" / "app")])
    assert len({p.path for p in found}) == len(found)


def test_the_search_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deep = tmp_path / "a" / "b" / "c"
    (deep / ".git" / "hooks").mkdir(parents=True)
    (tmp_path / "a" / ".bashrc").write_text("")
    assert paths_of(protected_paths([str(tmp_path)]), tmp_path) == {"a/.bashrc"}
    monkeypatch.setattr(protected_module, "SEARCH_CAP", 1)
    assert protected_paths([str(tmp_path)]) == []  # only the root itself was searched


def test_symlinked_directories_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    (outside / ".git" / "hooks").mkdir(parents=True)
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)
    assert protected_paths([str(root)]) == []


def test_defaults_protect_no_ordinary_sources() -> None:
    for ordinary in ("Makefile", "package.json", "setup.py", "src", "tests", ".gitmodules"):
        assert ordinary not in DEFAULT_PROTECTED


# The workload's attempts, run in a private mount namespace: first with nothing mounted (the
# attacks work), then with every protected path bind-mounted read-only as a backend would.
_ATTACK = r"""
import os, subprocess, sys
from corral.policy.protected import protected_paths
repo, protect = sys.argv[1], sys.argv[2] == "protect"
if protect:
    for p in protected_paths([repo]):
        if p.placeholder == "dir":
            os.mkdir(p.path)
        subprocess.run(["mount", "--bind", p.path, p.path], check=True)
        subprocess.run(["mount", "-o", "remount,bind,ro", p.path], check=True)
def attempt(name, action):
    try:
        action()
        print(name, "done")
    except OSError as exc:
        print(name, "blocked", exc.errno)
def plant_hook():
    os.makedirs(repo + "/.git/hooks", exist_ok=True)
    open(repo + "/.git/hooks/pre-commit", "w").write("evil")
attempt("hook", plant_hook)
attempt("config", lambda: open(repo + "/.git/config", "a").write("fsmonitor = evil"))
attempt("replace", lambda: os.rename(repo + "/.envrc", repo + "/moved"))
attempt("source", lambda: open(repo + "/main.py", "a").write("# edit"))
"""


@pytest.mark.timeout(30)
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts need root")
@pytest.mark.parametrize("mode", ["open", "protect"])
def test_read_only_mounts_of_the_result_stop_the_plant(tmp_path: Path, mode: str) -> None:
    repo = tmp_path / "repo"
    (repo / ".git").mkdir(parents=True)  # no hooks directory yet: needs the placeholder
    for name in (".git/config", ".envrc", "main.py"):
        (repo / name).write_text("original\n")
    command = ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", _ATTACK]
    out = subprocess.run(
        [*command, str(repo), mode], capture_output=True, text=True, check=True, timeout=25
    ).stdout
    results = dict(line.split(" ", 1) for line in out.splitlines())
    if mode == "open":  # the attacks work without protection, so the test can fail
        assert all(v == "done" for v in results.values()), results
    else:
        assert results["hook"].startswith("blocked")
        assert results["config"].startswith("blocked")
        assert results["replace"].startswith("blocked")
        assert results["source"] == "done"
