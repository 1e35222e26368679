"""`corral gc` releases agent identities that a crashed one-shot session run left behind, and
spares fresh ones (a run between allocating its identity and starting)."""

from __future__ import annotations

import os
import pwd
import time

import pytest

from corral.backends.session import identity as identities
from corral.lifecycle import gc, session

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="agent identities need root")


def _exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def test_gc_releases_abandoned_identities_only() -> None:
    old, fresh = identities.allocate(), identities.allocate()
    try:
        past = time.time() - session.ABANDONED_AFTER_S - 60
        os.utime(old.workspace, (past, past))
        report = gc.collect()
        assert old.name in report["identities"]
        assert not _exists(old.name) and not os.path.exists(old.workspace)
        assert _exists(fresh.name)
    finally:
        identities.release(fresh)
        if _exists(old.name):
            identities.release(old)
