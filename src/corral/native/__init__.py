"""Corral's native launcher: ``corral-launch``, built from ``launch.c`` by scripts/setup.sh.

The process backend plans in Python and launches through this small C program, which applies
the plan with a few system calls instead of three forks of a Python process.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess

from corral.errors import BackendUnavailableError

SOURCE = os.path.join(os.path.dirname(__file__), "launch.c")
BINARY = os.path.join(os.path.dirname(__file__), "corral-launch")
CFLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-D_FORTIFY_SOURCE=2", "-fstack-protector-strong")


@functools.cache
def launcher_path() -> str:
    """The launcher, (re)built when it is missing or older than its source."""
    if _fresh():
        return BINARY
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None or not os.access(os.path.dirname(BINARY), os.W_OK):
        raise BackendUnavailableError(
            f"Corral's native launcher {BINARY} is missing or out of date",
            remediation="run scripts/setup.sh (or: cc -O2 -o corral-launch launch.c in "
            f"{os.path.dirname(BINARY)}); building it needs gcc and libc6-dev",
            details={"mechanism": "native-launcher"},
        )
    build(compiler)
    return BINARY


def build(compiler: str = "cc") -> None:
    """Compile ``launch.c`` next to itself, atomically (concurrent callers may race)."""
    partial = f"{BINARY}.{os.getpid()}"
    result = subprocess.run(
        [compiler, *CFLAGS, "-o", partial, SOURCE], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise BackendUnavailableError(
            f"building Corral's native launcher failed: {result.stderr.strip()[-2000:]}",
            remediation="install gcc and libc6-dev (scripts/setup.sh does)",
            details={"mechanism": "native-launcher"},
        )
    os.chmod(partial, 0o755)
    os.replace(partial, BINARY)


def _fresh() -> bool:
    try:
        return os.stat(BINARY).st_mtime >= os.stat(SOURCE).st_mtime
    except FileNotFoundError:
        return False
