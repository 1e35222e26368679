"""Asyncio twins of the SDK calls: the same requests, awaited without blocking the loop.

Launching (fork plus a few milliseconds of sandbox set-up) runs on the loop's thread pool;
waiting uses the exit descriptor and stream pipes through the event loop itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from corral import api
from corral.api import ExecutionResult, RequestLike, ValidationResult
from corral.backends.base import LaunchOptions, SandboxProcess
from corral.backends.process.handle import communicate
from corral.plan import Plan


async def plan(request: RequestLike, *, experimental: bool = False) -> Plan:
    return await asyncio.to_thread(api.plan, request, experimental=experimental)


async def validate(request: RequestLike, *, experimental: bool = False) -> ValidationResult:
    return await asyncio.to_thread(api.validate, request, experimental=experimental)


async def run(
    request: RequestLike,
    *,
    input: bytes | None = None,
    experimental: bool = False,
    audit: bool = True,
) -> ExecutionResult:
    """Run to completion; cancelling the awaiting task kills the sandbox."""
    options = LaunchOptions(stdin="pipe" if input else "devnull")
    p, proc, trail = await asyncio.to_thread(
        api.audited_launch, request, options, experimental=experimental, audit=audit
    )
    try:
        out, err = await asyncio.to_thread(communicate, proc, input)
    except asyncio.CancelledError:
        proc.kill()
        raise
    finally:
        await asyncio.to_thread(proc.close)
        code = proc.wait()
        await asyncio.to_thread(trail.finish, proc)
    return ExecutionResult(
        out.decode(errors="replace"), err.decode(errors="replace"), code, proc.timed_out, p.warnings
    )


@dataclass
class AsyncProcess:
    """A spawned sandbox with asyncio streams. ``wait`` honours the plan's timeout."""

    _sandbox: SandboxProcess
    stdin: asyncio.StreamWriter | None
    stdout: asyncio.StreamReader | None
    stderr: asyncio.StreamReader | None
    warnings: tuple[str, ...] = ()
    _trail: api.RunAudit | None = None  # written when the workload is seen to end

    @property
    def pid(self) -> int:
        return self._sandbox.pid

    @property
    def returncode(self) -> int | None:
        return self._sandbox.returncode

    @property
    def timed_out(self) -> bool:
        return self._sandbox.timed_out

    async def wait(self) -> int:
        loop = asyncio.get_running_loop()
        exit_fd = self._sandbox.fileno_for_exit()
        deadline: float | None = getattr(self._sandbox, "deadline", None)
        while self._sandbox.poll() is None:
            if exit_fd is None:
                await asyncio.sleep(0.01)
                continue
            exited: asyncio.Future[None] = loop.create_future()

            def _exited(future: asyncio.Future[None] = exited) -> None:
                if not future.done():
                    future.set_result(None)

            loop.add_reader(exit_fd, _exited)
            try:
                timeout = None if deadline is None else max(0.0, deadline - loop.time())
                await asyncio.wait_for(exited, timeout)
            except TimeoutError:
                self._sandbox.expire()
            finally:
                loop.remove_reader(exit_fd)
        code = self._sandbox.returncode
        assert code is not None
        await self._ended()
        return code

    def kill(self) -> None:
        self._sandbox.kill()

    async def close(self) -> None:
        if self.stdin is not None:
            self.stdin.close()
        try:
            await asyncio.to_thread(self._sandbox.close)
        finally:
            await self._ended()

    async def _ended(self) -> None:
        if self._trail is not None:
            await asyncio.to_thread(self._trail.finish, self._sandbox)

    async def __aenter__(self) -> AsyncProcess:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def spawn(
    request: RequestLike, *, experimental: bool = False, audit: bool = True
) -> AsyncProcess:
    p, proc, trail = await asyncio.to_thread(
        api.audited_launch, request, LaunchOptions(), experimental=experimental, audit=audit
    )
    return await _wrap(proc, p.warnings, trail)


async def _wrap(
    proc: SandboxProcess, warnings: tuple[str, ...], trail: api.RunAudit | None = None
) -> AsyncProcess:
    loop = asyncio.get_running_loop()
    readers: list[asyncio.StreamReader | None] = []
    for stream in (proc.stdout, proc.stderr):
        if stream is None:
            readers.append(None)
            continue
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(_protocol_for(reader), stream)
        readers.append(reader)
    writer = None
    if proc.stdin is not None:
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, proc.stdin
        )
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return AsyncProcess(proc, writer, readers[0], readers[1], warnings, trail)


def _protocol_for(reader: asyncio.StreamReader) -> Callable[[], asyncio.StreamReaderProtocol]:
    return lambda: asyncio.StreamReaderProtocol(reader)


async def get_available_backends() -> list[dict[str, Any]]:
    return await asyncio.to_thread(api.get_available_backends)


async def get_platform_support() -> dict[str, Any]:
    return await asyncio.to_thread(api.get_platform_support)
