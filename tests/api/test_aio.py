"""The asyncio SDK twins."""

from __future__ import annotations

import asyncio

import pytest

from corral import aio


async def test_run() -> None:
    result = await aio.run({"process": {"commandLine": "echo async; exit 4"}})
    assert (result.stdout, result.exit_code) == ("async\n", 4)


async def test_runs_concurrently() -> None:
    results = await asyncio.gather(
        *(aio.run({"process": {"commandLine": f"echo {i}"}}) for i in range(5))
    )
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(5)]


async def test_spawn_streams() -> None:
    async with await aio.spawn(
        {"process": {"commandLine": "read x; echo got $x; echo e >&2"}}
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write(b"hi\n")
        await proc.stdin.drain()
        assert await proc.stdout.readline() == b"got hi\n"
        assert await proc.stderr.readline() == b"e\n"
        assert await proc.wait() == 0


@pytest.mark.timeout(30)
async def test_spawn_timeout() -> None:
    async with await aio.spawn({"process": {"commandLine": "sleep 30", "timeout": 200}}) as proc:
        assert await proc.wait() == 137
        assert proc.timed_out


async def test_validate_and_backends() -> None:
    assert (await aio.validate({"process": {"commandLine": "true"}})).valid
    assert any(b["name"] == "process" for b in await aio.get_available_backends())
