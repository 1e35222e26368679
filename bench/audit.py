"""Audit log cost: per event on a small and a large log, verify throughput, and a one-shot
`true` run with the four events a run writes (request, plan, launch, exit) against the same
run without audit. Prints medians and the ratio.

    /opt/corral/venv/bin/python bench/audit.py [--events N] [--runs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable

import corral
from corral.audit import Actor, AuditEvent, AuditLog, verify

REQUEST = {"version": "1.0.0", "process": {"commandLine": "true"}}


def per_event_ms(log: AuditLog, actor: Actor, count: int) -> float:
    start = time.perf_counter()
    for i in range(count):
        log.append(AuditEvent("launch", actor, sandbox="bench", pid=i, decision="allow"))
    return (time.perf_counter() - start) / count * 1000


def cold_writer_ms(path: str, actor: Actor, count: int) -> float:
    """A new writer per event (as a one-shot CLI is): open, read the tail, append, close."""
    start = time.perf_counter()
    for i in range(count):
        with AuditLog(path) as log:
            log.append(AuditEvent("launch", actor, sandbox="bench", pid=i, decision="allow"))
    return (time.perf_counter() - start) / count * 1000


def run_corral() -> int:
    return corral.run(REQUEST).exit_code


def run_plain() -> int:
    return subprocess.run(["true"], check=False).returncode


def run_once(workload: Callable[[], int], log: AuditLog | None, actor: Actor) -> float:
    start = time.perf_counter()
    if log is not None:
        log.append(AuditEvent("request", actor, decision="allow", data={"request": REQUEST}))
        log.append(AuditEvent("plan", actor, data={"backend": "process"}))
    exit_code = workload()
    if log is not None:
        log.append(AuditEvent("launch", actor, pid=0, decision="allow"))
        log.append(AuditEvent("exit", actor, pid=0, data={"exitCode": exit_code}))
    return (time.perf_counter() - start) * 1000


def choose_workload() -> tuple[str, Callable[[], int]]:
    """corral.run when this checkout can run it; else a bare `true` (a stricter baseline)."""
    try:
        run_corral()
    except Exception as exc:  # any failure: report it and fall back, the bench is about audit
        print(f"corral.run unavailable here ({type(exc).__name__}: {exc}); using bare `true`")
        return "subprocess `true`", run_plain
    return "corral.run `true`", run_corral


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--runs", type=int, default=40)
    args = parser.parse_args()
    actor = Actor.from_process({"kind": "agent", "name": "bench"})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "audit.jsonl")
        with AuditLog(path) as log:
            small = per_event_ms(log, actor, args.events)
            large = per_event_ms(log, actor, args.events)  # the log now holds 2N records
        cold = cold_writer_ms(path, actor, 200)
        size_mb = os.path.getsize(path) / 1e6
        start = time.perf_counter()
        result = verify(path)
        verify_s = time.perf_counter() - start
        assert result.ok, result.problem

        label, workload = choose_workload()
        with AuditLog(os.path.join(tmp, "run.jsonl")) as log:
            run_once(workload, log, actor)  # warm up
            on, off = [], []
            for _ in range(args.runs):  # interleaved, so drift hits both sides alike
                off.append(run_once(workload, None, actor))
                on.append(run_once(workload, log, actor))
    print(f"append, fresh log        : {small * 1000:7.1f} us/event ({args.events} events)")
    print(f"append, {2 * args.events} records  : {large * 1000:7.1f} us/event")
    print(f"append, new writer (cold): {cold * 1000:7.1f} us/event (reads the tail once)")
    print(
        f"verify                   : {result.records / verify_s:9.0f} records/s ({size_mb:.1f} MB)"
    )
    med_off, med_on = statistics.median(off), statistics.median(on)
    print(f"{label}, audit off: {med_off:6.2f} ms (median of {args.runs})")
    print(f"{label}, audit on : {med_on:6.2f} ms (4 events)")
    print(f"audit adds                : {med_on - med_off:6.2f} ms per run")
    note = "" if workload is run_corral else "; the target is for corral.run, not a bare `true`"
    print(f"ratio on/off              : {med_on / med_off:6.3f} (target <= 1.10{note})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
