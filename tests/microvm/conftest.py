"""One booted micro-VM shared by the session (a boot under TCG costs seconds), with a host tree
of granted, denied and unshared paths to attack from inside the guest."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from microvm_support import Tree, make_plan

from corral.backends.microvm import MicroVM, MicrovmBackend


@pytest.fixture(scope="session")
def backend() -> MicrovmBackend:
    backend = MicrovmBackend()
    info = backend.probe()
    if not info.available:
        pytest.skip(f"micro-VM backend unavailable: {info.reason}")
    return backend


@pytest.fixture(scope="session")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Tree:
    base = tmp_path_factory.mktemp("microvm")
    t = Tree(base / "ro", base / "rw", base / "rw" / "secret", base / "hidden")
    for d in (t.ro, t.rw, t.denied, t.hidden):
        d.mkdir()
    (t.ro / "data").write_text("read-only data\n")
    (t.denied / "key").write_text("DENIED-SECRET\n")
    (t.hidden / "key").write_text("HIDDEN-SECRET\n")
    return t


@pytest.fixture(scope="session")
def vm(backend: MicrovmBackend, tree: Tree) -> Iterator[MicroVM]:
    machine = backend.boot(make_plan(backend, tree))
    yield machine
    machine.shutdown()
