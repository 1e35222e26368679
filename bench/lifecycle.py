"""Lifecycle figures: provision and start time, warm exec latency over N execs of `true`, memory
of an idle sandbox, side by side with one-shot runs measured in the same process.

    /opt/corral/venv/bin/python bench/lifecycle.py [--execs 1000] [--one-shots 100]

Targets (issue 5): warm exec <= 3 ms p50; idle sandbox <= 5 MiB.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

PROVISION = {"version": "1.0.0", "phase": "provision", "containment": "process"}
LONE_SANDBOX = """
from corral.lifecycle import api
sid = api.provision_container({"version": "1.0.0", "phase": "provision", "containment": "process"})
api.start_container(sid.container_id)
print(sid.container_id)
"""


def _timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return (time.perf_counter() - began) * 1000


def _percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return (
        f"p50 {p(0.5):7.2f} ms   p99 {p(0.99):7.2f} ms   mean {statistics.fmean(ordered):7.2f} ms"
    )


def _memory_kib(pid: int) -> tuple[int, int]:
    """(PSS, RSS) in KiB of a process, from smaps_rollup."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Pss", "Rss"):
                values[key] = int(rest.split()[0])
    return values["Pss"], values["Rss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--execs", type=int, default=1000)
    parser.add_argument("--one-shots", type=int, default=100)
    args = parser.parse_args()
    os.environ.setdefault("CORRAL_RUN_DIR", tempfile.mkdtemp(prefix="corral-bench-") + "/corral")
    os.environ["CORRAL_NO_SERVICE"] = "1"
    import corral
    from corral.lifecycle import api, launch, manager, store

    api.run_in_container  # noqa: B018  (import cost out of the figures)
    corral.run({"version": "1.0.0", "process": {"commandLine": "true"}})  # warm caches

    provision_ms, start_ms, ids = [], [], []
    try:
        for _ in range(10):
            provision_ms.append(
                _timed(lambda: ids.append(api.provision_container(PROVISION).container_id))
            )
            start_ms.append(_timed(lambda: api.start_container(ids[-1])))
        sid = ids[0]
        for _ in range(20):
            api.run_in_container(sid, "true")
        exec_ms = [_timed(lambda: api.run_in_container(sid, "true")) for _ in range(args.execs)]
        one_shot_ms = [
            _timed(lambda: corral.run({"version": "1.0.0", "process": {"commandLine": "true"}}))
            for _ in range(args.one_shots)
        ]
        # Idle memory of a sandbox whose creator has exited (nothing shares its pages any more).
        lone = subprocess.run(
            [sys.executable, "-c", LONE_SANDBOX], capture_output=True, text=True, check=True
        ).stdout.strip()
        ids.append(lone)
        time.sleep(0.5)
        state = store.load(store.find_sandbox(lone, os.getuid()))
        assert state is not None and state.supervisor_pid is not None
        sup_pss, sup_rss = _memory_kib(state.supervisor_pid)
        init_pid = launch._children(state.supervisor_pid)[0]
        init_pss, init_rss = _memory_kib(init_pid)

        print(f"provision              {_percentiles(provision_ms)}")
        print(f"start                  {_percentiles(start_ms)}")
        print(f"warm exec `true` x{args.execs:<5} {_percentiles(exec_ms)}")
        print(f"one-shot `true` x{args.one_shots:<6} {_percentiles(one_shot_ms)}")
        ratio = statistics.median(one_shot_ms) / statistics.median(exec_ms)
        print(f"warm exec is {ratio:.1f}x faster than a one-shot run (p50)")
        total_pss = (sup_pss + init_pss) / 1024
        print(
            f"idle sandbox (creator exited): supervisor PSS {sup_pss / 1024:.1f} MiB (RSS {sup_rss / 1024:.1f}), "
            f"init PSS {init_pss / 1024:.1f} MiB (RSS {init_rss / 1024:.1f}); total PSS {total_pss:.1f} MiB"
        )
        print(f"targets: warm exec p50 <= 3 ms: {statistics.median(exec_ms) <= 3}; "
              f"idle <= 5 MiB: {total_pss <= 5}")  # fmt: skip
    finally:
        for sandbox in ids:
            manager.deprovision(sandbox)


if __name__ == "__main__":
    main()
