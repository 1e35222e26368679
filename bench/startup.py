"""One-shot `true`: Corral's SDK and CLI side by side with raw bwrap (all namespaces) and the
reference MXC executor, in one run. Prints medians and ratios against the reference.

    /opt/corral/venv/bin/python bench/startup.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import corral

REQUEST = {"version": "1.0.0", "process": {"commandLine": "true"}}
ORACLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "mxc", "oracle")


def measure(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm caches (probe, imports, page cache)
    samples = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples) * 1000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(REQUEST, f)
        config = f.name

    def sdk() -> None:
        assert corral.run(REQUEST).exit_code == 0

    # The console script users run (`python -m corral` adds runpy's own imports).
    command = os.path.join(os.path.dirname(sys.executable), "corral")

    def cli() -> None:
        subprocess.run([command, "exec", config], check=True)

    bwrap_cmd = ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
                 "--symlink", "usr/bin", "/bin", "--symlink", "usr/lib", "/lib",
                 "--symlink", "usr/lib64", "/lib64", "--proc", "/proc", "--dev", "/dev",
                 "/bin/sh", "-c", "true"]  # fmt: skip

    def bwrap() -> None:
        subprocess.run(bwrap_cmd, check=True)

    oracle = os.path.realpath(ORACLE)

    def reference() -> None:
        subprocess.run([oracle, config], check=True, capture_output=True)

    rows: list[tuple[str, float]] = []
    if os.path.exists(oracle):
        rows.append(("MXC reference (oracle, bwrap backend)", measure(reference, args.runs)))
    if shutil.which("bwrap"):
        rows.append(("raw bwrap --unshare-all", measure(bwrap, args.runs)))
    rows.append(("corral SDK  corral.run()", measure(sdk, args.runs)))
    rows.append(("corral CLI  corral exec", measure(cli, args.runs)))
    base = rows[0][1]
    print(f"one-shot `true`, median of {args.runs} runs (baseline: {rows[0][0]})")
    for name, ms in rows:
        print(f"  {name:42} {ms:8.1f} ms   {ms / base:5.2f}x")
    os.unlink(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
