"""asyncio twins of :mod:`corral.lifecycle.api`. Control phases are short and run in a worker
thread; an exec's exit is awaited on its control connection, without a thread."""

from __future__ import annotations

import asyncio
from typing import Any

from corral.api import ExecutionResult, Process, RequestLike
from corral.contract.model import ProcessSpec
from corral.lifecycle import api
from corral.lifecycle.api import ProvisionResult


async def provision_container(request: RequestLike) -> ProvisionResult:
    return await asyncio.to_thread(api.provision_container, request)


async def start_container(sandbox_id: str) -> None:
    await asyncio.to_thread(api.start_container, sandbox_id)


async def stop_container(sandbox_id: str) -> None:
    await asyncio.to_thread(api.stop_container, sandbox_id)


async def deprovision_container(sandbox_id: str) -> None:
    await asyncio.to_thread(api.deprovision_container, sandbox_id)


async def run_in_container(
    sandbox_id: str,
    request_or_process: RequestLike | ProcessSpec | str,
    *,
    input: bytes | None = None,
) -> ExecutionResult:
    return await asyncio.to_thread(
        api.run_in_container, sandbox_id, request_or_process, input=input
    )


async def spawn_in_container(
    sandbox_id: str, request_or_process: RequestLike | ProcessSpec | str
) -> Process:
    return await asyncio.to_thread(api.spawn_in_container, sandbox_id, request_or_process)


async def wait(process: Process) -> int:
    """Await a spawned workload's exit without blocking the loop."""
    fd = process._sandbox.fileno_for_exit()
    while process.poll() is None and fd is not None:
        ready = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        loop.add_reader(fd, ready.set_result, None)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
    return process.wait()


async def list_containers() -> list[dict[str, Any]]:
    return await asyncio.to_thread(api.list_containers)
