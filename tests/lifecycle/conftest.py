"""Shared fixtures: a private Corral run directory per test, no service unless a test starts one."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest


@pytest.fixture
def run_dir(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    base = str(tmp_path_factory.mktemp("run") / "corral")
    monkeypatch.setenv("CORRAL_RUN_DIR", base)
    monkeypatch.setenv("CORRAL_NO_SERVICE", "1")
    yield base
    from corral.lifecycle import gc, manager

    for entry in manager.list_sandboxes() if os.path.isdir(base) else []:
        from corral.lifecycle import api

        with contextlib.suppress(Exception):
            api.deprovision_container(entry["sandboxId"])
    if os.path.isdir(base):
        gc.collect()


# The root service fixture of test_users also serves the session tests.
from tests.lifecycle.test_users import service  # noqa: E402, F401
