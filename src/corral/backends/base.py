"""The backend interface: the strict point of cut-off between policy and enforcement.

A backend receives a :class:`corral.plan.Plan` (plain, resolved data; never the wire request)
and returns a :class:`SandboxProcess`. It also reports, through :meth:`Backend.probe`, which
enforcement mechanisms it can provide on this host so the planner can refuse what it cannot.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from corral.plan import Plan

StdioMode = Literal["pipe", "inherit", "devnull"]


@dataclass(frozen=True)
class BackendInfo:
    """What a backend can do on this host, as found by a real probe."""

    name: str
    available: bool
    reason: str = ""  # why it is unavailable, and how to fix it
    mechanisms: dict[str, str] = field(default_factory=dict)  # mechanism -> detail
    containments: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "available": self.available,
            "reason": self.reason or None,
            "containments": list(self.containments),
            "mechanisms": dict(self.mechanisms),
        }


@dataclass(frozen=True)
class LaunchOptions:
    stdin: StdioMode = "pipe"
    stdout: StdioMode = "pipe"
    stderr: StdioMode = "pipe"
    pty: tuple[int, int] | None = None  # (rows, columns): one terminal for all three streams
    audit: Callable[[dict[str, Any]], None] | None = None  # enforcement decisions (network, ...)
    # Ask the kernel for audit records of the workload's Landlock and seccomp denials (read by
    # corral.audit.kernel_denials; only worth it while someone listens).
    log_denials: bool = False


class SandboxProcess(abc.ABC):
    """A running workload. Streams are binary; ``wait`` enforces the plan's timeout."""

    stdin: IO[bytes] | None = None
    stdout: IO[bytes] | None = None
    stderr: IO[bytes] | None = None
    pty_fd: int | None = None  # master side when launched with a pty
    pid: int

    # Set by each backend as the workload ends; read through the properties below.
    _returncode: int | None = None
    _timed_out: bool = False

    @property
    def timed_out(self) -> bool:
        return self._timed_out

    @property
    def returncode(self) -> int | None:
        return self._returncode

    @abc.abstractmethod
    def wait(self, timeout: float | None = None) -> int:
        """Wait for exit (killing the whole tree at the plan's deadline); the exit code,
        128+N for a signal. Raises TimeoutError if ``timeout`` (seconds) passes first."""

    @abc.abstractmethod
    def poll(self) -> int | None: ...

    @abc.abstractmethod
    def kill(self) -> None:
        """Kill every process of the sandbox (idempotent)."""

    def expire(self) -> None:
        """The plan's timeout passed: kill everything and report ``timed_out``."""
        self.kill()

    def resize(self, rows: int, columns: int) -> None:
        raise NotImplementedError("this process was not started with a pty")

    @abc.abstractmethod
    def close(self) -> None:
        """Kill if still running and release every resource (fds, cgroups, mounts)."""

    def fileno_for_exit(self) -> int | None:
        """A file descriptor that becomes readable when the workload exits (for asyncio)."""
        return None

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Backend(Protocol):
    name: str

    def probe(self) -> BackendInfo: ...

    def launch(self, plan: Plan, options: LaunchOptions) -> SandboxProcess: ...
