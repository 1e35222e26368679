"""Host-side limits on the QEMU process: a cgroup (corral.kernel.cgroups) that QEMU joins
before it executes, besides the guest's own RAM and vCPUs.

Guest RAM bounds what the workload can use; the memory cgroup bounds QEMU itself (guest RAM plus
QEMU's own allocations: TCG's translated code, device buffers, the 9p server), so neither a
runaway device model nor an exploited QEMU can take more of the host. The CPU cgroup caps the
time all of QEMU's threads (every vCPU included) get to ``cpu`` percent of one host CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from corral.kernel import cgroups

# QEMU's own memory above guest RAM. Measured under TCG here with a 256 MiB guest whose memory
# is full: ~100 MiB resident beyond guest RAM (the translation cache grows with the code the
# guest runs); about twice that for headroom. Page cache QEMU reads (the snapshot) is charged
# too, but is reclaimed under the limit.
QEMU_OVERHEAD_MB = 192


@dataclass(frozen=True)
class HostLimits:
    memory_mb: int | None  # the cgroup's memory limit: guest RAM + QEMU_OVERHEAD_MB
    cpu_percent: int | None


def for_guest(guest_memory_mb: int | None, cpu_percent: int | None) -> HostLimits | None:
    """The cgroup for a guest of ``guest_memory_mb`` (the plan's memoryMb) and the plan's cpu
    limit; None when the plan sets neither (QEMU then runs in its caller's cgroup)."""
    if not guest_memory_mb and not cpu_percent:
        return None
    memory = guest_memory_mb + QEMU_OVERHEAD_MB if guest_memory_mb else None
    return HostLimits(memory, cpu_percent or None)


def create(name: str, limits: HostLimits) -> cgroups.Cgroup:
    """The cgroup ``name``; a PolicyError naming the controller when a limit cannot be set."""
    return cgroups.create(
        name, memory_mb=limits.memory_mb, pids=None, cpu_percent=limits.cpu_percent
    )


def remove_named(name: str) -> None:
    """Remove a leftover group ``name`` (a VM whose owner was killed), its members killed."""
    for path in cgroups.list_leftovers():
        if path.rstrip("/").rpartition("/")[2] == name:
            cgroups.remove_leftover(path)
