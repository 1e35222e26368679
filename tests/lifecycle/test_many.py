"""50 sandboxes at once on a 2-core machine, with no cross-talk between them."""

from __future__ import annotations

import pytest
from lifecycle_support import needs_lifecycle

pytestmark = [needs_lifecycle, pytest.mark.slow, pytest.mark.timeout(300)]
COUNT = 50
PROVISION = {"version": "1.0.0", "phase": "provision", "containment": "process"}


def test_fifty_sandboxes_see_only_themselves(run_dir: str) -> None:
    from corral.lifecycle import api

    ids = [api.provision_container(PROVISION).container_id for _ in range(COUNT)]
    for sid in ids:
        api.start_container(sid)
    for n, sid in enumerate(ids):
        cmd = f"echo {n} > /tmp/mine; sleep 1000 > /dev/null 2>&1 & echo started"
        assert api.run_in_container(sid, cmd).stdout == "started\n"
    for n, sid in enumerate(ids):
        result = api.run_in_container(sid, "ls /tmp; cat /tmp/mine; ls /proc | grep -c '^[0-9]'")
        names, mine, processes = result.stdout.split("\n")[:-1][:-2], *result.stdout.split()[-2:]
        assert (names, mine) == (["mine"], str(n))
        # init, its one background sleep, and this exec's sh, ls and grep: nothing of the others
        assert int(processes) <= 5, result.stdout
    assert len({e["supervisorPid"] for e in api.list_containers()}) == COUNT
    for sid in ids:
        api.deprovision_container(sid)
