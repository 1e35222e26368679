"""Learning mode on a real workload: a deny-by-default request fails, learning proposes a
policy, the same workload then succeeds under enforcement, and the proposal grants nothing
the workload did not use. As root and as an unprivileged user."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from tests.conftest import ensure_test_user
from tests.learn.support import LearnRunner, Workspace, http_server

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=["root", "user"])
def learner(request: pytest.FixtureRequest, user_src: str) -> LearnRunner:
    if request.param == "root":
        return LearnRunner(None, None)
    return LearnRunner(ensure_test_user(), user_src)


@pytest.fixture
def ws(learner: LearnRunner) -> Iterator[Workspace]:
    workspace = Workspace.create(learner.uid, learner.gid)
    yield workspace
    workspace.remove()


def test_learned_policy_is_minimal_and_lets_the_workload_run(
    learner: LearnRunner, ws: Workspace
) -> None:
    with http_server() as port:
        request = ws.request(f"python3 app.py http://10.0.2.2:{port}/")

        refused = learner.run(request)
        assert refused["exit_code"] != 0
        assert "config.toml" in refused["stderr"]  # the deny-by-default view has no config

        learned = learner.learn(request)
        assert learned["exit_code"] == 0, learned["stderr"]
        assert "pong" in learned["stdout"]  # the learning run reached the loopback server

        proposed = learned["proposed"]
        fs = proposed["filesystem"]
        assert fs["readonlyPaths"] == [ws.work, ws.config]
        assert fs["readwritePaths"] == [ws.cache]
        assert "deniedPaths" not in fs
        assert proposed["network"] == {"ingress": {"hostLoopback": "allow"}}
        assert proposed["process"] == request["process"]
        granted = [*fs["readonlyPaths"], *fs["readwritePaths"]]
        assert not any(ws.secret.startswith(g.rstrip("/") + "/") or ws.secret == g for g in granted)
        assert not any(g in (ws.home, os.path.dirname(ws.config)) for g in granted)
        assert f'+      "{ws.config}"' in learned["diff"]

        enforced = learner.run(proposed)
        assert enforced["exit_code"] == 0, enforced["stderr"]
        assert enforced["stdout"].split() == ["colour", "=", "'blue'", "pong"]
        with open(f"{ws.cache}/result.txt") as f:
            assert f.read() == "cached"  # the enforcement run wrote for real, where allowed


def test_writes_outside_read_write_grants_never_reach_the_host(
    learner: LearnRunner, ws: Workspace
) -> None:
    outside = f"{ws.root}/outside.txt"
    script = (
        f"echo planted > {ws.home}/.bashrc && "
        f"echo changed >> {ws.config} && "
        f"rm {ws.secret} && "
        f"mkdir {ws.home}/newdir && echo x > {ws.home}/newdir/f && "
        f"echo out > {outside} && "
        f"echo granted > {ws.cache}/granted.txt && "
        # The writes really happened inside: the workload sees its own changes.
        f"cat {ws.home}/.bashrc {ws.config} {ws.home}/newdir/f {outside} && "
        f"test ! -e {ws.secret} && echo all-writes-succeeded"
    )
    request = ws.request(script, readwritePaths=[ws.cache])
    learned = learner.learn(request)
    assert learned["exit_code"] == 0, learned["stderr"]
    assert "planted" in learned["stdout"] and "changed" in learned["stdout"]
    assert "all-writes-succeeded" in learned["stdout"]

    assert not os.path.exists(f"{ws.home}/.bashrc")
    with open(ws.config) as f:
        assert f.read() == "colour = 'blue'\n"
    assert os.path.exists(ws.secret)
    assert not os.path.exists(f"{ws.home}/newdir")
    assert not os.path.exists(outside)
    with open(f"{ws.cache}/granted.txt") as f:  # the request's own grant is the real one
        assert f.read() == "granted\n"

    wanted = {(d["grant"], d["access"]) for d in learned["denials"]}
    assert wanted == {
        (ws.home, "rw"),  # .bashrc created, newdir made: new names in home
        (ws.config, "rw"),  # appended to in place: that file only
        (ws.config, "ro"),  # and read back
        (os.path.dirname(ws.secret), "rw"),  # removing a name needs its directory
        (ws.root, "rw"),  # outside.txt
    }
    # The narrower grants all lie inside the root's: the proposal keeps only that one.
    assert learned["proposed"]["filesystem"]["readwritePaths"] == [ws.cache, ws.root]
