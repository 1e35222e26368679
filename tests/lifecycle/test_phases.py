"""Every transition and every phase error of the lifecycle, through the SDK."""

from __future__ import annotations

import os

import pytest
from lifecycle_support import needs_lifecycle

from corral.errors import CorralError, ErrorCode

pytestmark = [needs_lifecycle, pytest.mark.timeout(60)]

PROVISION = {"version": "1.0.0", "phase": "provision", "containment": "process"}


def _code(call: object, *args: object) -> ErrorCode:
    with pytest.raises(CorralError) as info:
        call(*args)  # type: ignore[operator]
    return info.value.code


def test_full_lifecycle_and_restart(run_dir: str) -> None:
    from corral.lifecycle import api

    sid = api.provision_container(PROVISION).container_id
    assert sid.startswith("corral-process:")
    assert _code(api.run_in_container, sid, "true") == ErrorCode.NOT_STARTED
    assert _code(api.stop_container, sid) == ErrorCode.NOT_STARTED
    api.start_container(sid)
    assert _code(api.start_container, sid) == ErrorCode.ALREADY_STARTED
    assert api.run_in_container(sid, "echo one > /tmp/f").exit_code == 0
    assert api.run_in_container(sid, "cat /tmp/f").stdout == "one\n"
    api.stop_container(sid)
    assert _code(api.stop_container, sid) == ErrorCode.ALREADY_STOPPED
    assert _code(api.run_in_container, sid, "true") == ErrorCode.NOT_STARTED
    api.start_container(sid)  # start again works
    assert api.run_in_container(sid, "exit 3").exit_code == 3
    assert [e["exitCode"] for e in api.container_logs(sid)] == [0, 0, 3]
    api.deprovision_container(sid)
    for call in (api.start_container, api.stop_container, api.deprovision_container):
        assert _code(call, sid) == ErrorCode.STALE_ID
    assert _code(api.run_in_container, sid, "true") == ErrorCode.STALE_ID
    assert not os.listdir(os.path.join(run_dir, str(os.getuid())))


def test_deprovision_from_every_phase(run_dir: str) -> None:
    from corral.lifecycle import api

    for steps in ((), ("start",), ("start", "stop")):
        sid = api.provision_container(PROVISION).container_id
        for step in steps:
            getattr(api, f"{step}_container")(sid)
        api.deprovision_container(sid)
        assert _code(api.start_container, sid) == ErrorCode.STALE_ID


@pytest.mark.parametrize(
    "bad", ["", "nope", "corral-process:", "corral-process:XYZ", "x:" + "0" * 24, 5]
)
def test_malformed_ids(run_dir: str, bad: object) -> None:
    from corral.lifecycle import api

    assert _code(api.start_container, bad) == ErrorCode.MALFORMED_ID


def test_unknown_well_formed_id_is_stale(run_dir: str) -> None:
    from corral.lifecycle import api

    assert _code(api.start_container, "corral-process:" + "0" * 24) == ErrorCode.STALE_ID


def test_exec_timeout_and_own_env(run_dir: str) -> None:
    from corral.lifecycle import api

    sid = api.provision_container(PROVISION).container_id
    api.start_container(sid)
    exec_req = {"version": "1.0.0", "phase": "exec", "sandboxId": sid,
                "process": {"commandLine": "echo $GREETING", "env": ["GREETING=hi"]}}  # fmt: skip
    assert api.run_in_container(sid, exec_req).stdout == "hi\n"
    slow = dict(exec_req, process={"commandLine": "sleep 30", "timeout": 300})
    result = api.run_in_container(sid, slow)
    assert result.timed_out and result.exit_code == 137


def test_wire_envelopes(run_dir: str) -> None:
    from corral import api as sdk
    from corral.lifecycle import api

    body = api.handle(sdk.parse(PROVISION))
    sid = body["sandboxId"]
    api.handle(sdk.parse({"version": "1.0.0", "phase": "start", "sandboxId": sid}))
    out = api.handle(sdk.parse({"version": "1.0.0", "phase": "exec", "sandboxId": sid,
                                "process": {"commandLine": "echo wire"}}))  # fmt: skip
    assert (out["exitCode"], out["stdout"]) == (0, "wire\n")
    api.handle(sdk.parse({"version": "1.0.0", "phase": "deprovision", "sandboxId": sid}))


def test_spawn_with_pipes_and_pty(run_dir: str) -> None:
    from corral.lifecycle import api

    sid = api.provision_container(PROVISION).container_id
    api.start_container(sid)
    with api.spawn_in_container(sid, "read line; echo got $line") as proc:
        out, _ = proc.communicate(b"hello\n")
        assert (proc.wait(), out) == (0, b"got hello\n")
    with api.spawn_in_container_with_pty(sid, "test -t 1 && stty size", rows=20, columns=70) as tty:
        out, _ = tty.communicate()
        assert tty.wait() == 0 and out.split() == [b"20", b"70"]


async def test_asyncio_twins(run_dir: str) -> None:
    from corral.lifecycle import aio

    sid = (await aio.provision_container(PROVISION)).container_id
    await aio.start_container(sid)
    result = await aio.run_in_container(sid, "echo async")
    assert result.stdout == "async\n"
    proc = await aio.spawn_in_container(sid, "exit 4")
    assert await aio.wait(proc) == 4
    proc.close()
    await aio.stop_container(sid)
    await aio.deprovision_container(sid)


def test_resource_limits_hold_across_execs_and_leave_no_cgroup(run_dir: str) -> None:
    from corral.lifecycle import api, gc

    limited = dict(PROVISION, corral={"resources": {"pids": 16}})
    sid = api.provision_container(limited).container_id
    api.start_container(sid)
    token = sid.rpartition(":")[2]
    assert [p for p in gc.sandbox_cgroups() if p.endswith(token)], "no cgroup for the sandbox"
    # The limit covers the whole sandbox: sleepers left by one exec count against the next.
    ten = "for i in 0 1 2 3 4 5 6 7 8 9; do sleep 100 & done"  # they keep the pipes open
    assert api.run_in_container(sid, ten).stderr == ""  # 12 of 16: supervisor, init, sleepers
    result = api.run_in_container(sid, ten)
    assert "fork" in result.stderr.lower(), result  # the second ten do not fit
    api.stop_container(sid)
    assert not [p for p in gc.sandbox_cgroups() if p.endswith(token)]
    api.start_container(sid)
    assert [p for p in gc.sandbox_cgroups() if p.endswith(token)]
    api.deprovision_container(sid)
    assert not [p for p in gc.sandbox_cgroups() if p.endswith(token)]


def test_background_process_holding_the_pipes_does_not_hang_exec(run_dir: str) -> None:
    from corral.lifecycle import api

    sid = api.provision_container(PROVISION).container_id
    api.start_container(sid)
    result = api.run_in_container(sid, "sleep 100 & echo started")
    assert (result.exit_code, result.stdout) == (0, "started\n")
    assert api.run_in_container(sid, "pgrep -c sleep || ls /proc").exit_code == 0
    api.deprovision_container(sid)
