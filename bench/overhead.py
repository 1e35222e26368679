"""Sandbox overhead on a syscall- and file-heavy workload: byte-compiling a copy of the
Python standard library into a workspace, inside a process sandbox vs directly on the host.

    /opt/corral/venv/bin/python bench/overhead.py [--runs N]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import corral

STDLIB = "/usr/lib/python3.11"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    ws = tempfile.mkdtemp(prefix="corral-overhead-")
    shutil.copytree(
        STDLIB,
        f"{ws}/lib",
        ignore=shutil.ignore_patterns("__pycache__", "site-packages", "dist-packages", "test"),
    )
    command = f"/usr/bin/python3 -m compileall -q -f -j 1 {ws}/lib"
    request = {
        "version": "1.0.0",
        "process": {"commandLine": command},
        "filesystem": {"readwritePaths": [ws]},
    }

    def host() -> None:
        subprocess.run(["/bin/sh", "-c", command], check=True)

    def sandbox() -> None:
        result = corral.run(request)
        assert result.exit_code == 0, result.stderr

    host()
    # Wall time, and the CPU time of the whole process tree (every level waits for its
    # children, so RUSAGE_CHILDREN covers the sandbox's workload too): on a shared VM, steal
    # time moves the wall clock by ±20 % between runs and the CPU time much less.
    wall: dict[str, list[float]] = {"host": [], "sandbox": []}
    cpu: dict[str, list[float]] = {"host": [], "sandbox": []}
    for _ in range(args.runs):  # interleaved, so drift on a shared machine hits both alike
        for name, fn in (("host", host), ("sandbox", sandbox)):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            fn()
            wall[name].append(time.perf_counter() - t)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[name].append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    print(f"compileall of the stdlib copy, median of {args.runs} interleaved runs")
    for label, samples in (("wall time", wall), ("CPU time (user+sys)", cpu)):
        h, s = statistics.median(samples["host"]), statistics.median(samples["sandbox"])
        print(f"  {label}")
        print(f"    host     {h * 1000:8.0f} ms   1.000x")
        print(
            f"    sandbox  {s * 1000:8.0f} ms   {s / h:.3f}x  (overhead {100 * (s / h - 1):+.1f} %)"
        )
    shutil.rmtree(ws)
    return 0


if __name__ == "__main__":
    sys.exit(main())
