"""The `microvm` backend (also serving `vm`): the workload runs in a QEMU micro-VM whose guest
sees only the plan's filesystem grants (9p from a private mount namespace) and, when the plan
has network rules, a NIC on QEMU's user-mode network whose every connection is a socket of
QEMU in its own network namespace, under corral.net's nftables rules (no NIC otherwise); the
guest kernel sits behind a hypervisor (KVM when a real probe boots, else TCG)."""

from __future__ import annotations

import functools
import math
import os
import shutil
from typing import TYPE_CHECKING

from corral.backends.base import BackendInfo, LaunchOptions, SandboxProcess
from corral.backends.microvm import accel, limits, snapshot
from corral.backends.microvm import network as guest_network
from corral.backends.microvm.image import (
    DEFAULT_CACHE_DIR,
    DEFAULT_GUEST_DIR,
    GuestImage,
    guest_image,
)
from corral.backends.microvm.process import GuestProcess
from corral.backends.microvm.qemu import QEMU, Machine
from corral.backends.microvm.vm import MicroVM
from corral.errors import BackendUnavailableError, CorralError, PolicyError
from corral.plan import Plan

if TYPE_CHECKING:
    from corral.net.attachment import Audit

NAME = "microvm"
CONTAINMENTS = ("microvm", "vm")
DEFAULT_MEMORY_MB = 256
MIN_MEMORY_MB = 128  # the guest kernel and agent need this much before the workload runs

__all__ = ["GuestProcess", "MicroVM", "MicrovmBackend", "machine_for"]


class MicrovmBackend:
    name = NAME

    def __init__(
        self,
        guest_dir: str = DEFAULT_GUEST_DIR,
        cache_dir: str = DEFAULT_CACHE_DIR,
        *,
        fast_start: bool = True,
        minimal_kernel: bool = True,
    ) -> None:
        """``minimal_kernel``: boot the kernel of `corral vm build-kernel` when it is built."""
        self._guest_dir = guest_dir
        self._cache_dir = cache_dir
        self._fast_start = fast_start
        self._minimal_kernel = minimal_kernel
        self._image: GuestImage | None = None

    def probe(self) -> BackendInfo:
        return _probe(self._guest_dir, self._cache_dir, self._minimal_kernel)

    def image(self) -> GuestImage:
        """The guest image, found (and built when missing) once per backend: hashing its
        sources costs milliseconds at every boot otherwise."""
        if self._image is None:
            self._image = guest_image(
                self._guest_dir, self._cache_dir, prefer_minimal=self._minimal_kernel
            )
        return self._image

    def accelerator(self) -> accel.Accelerator:
        """KVM if a probe guest really boots under it on this host (cached per boot), else TCG."""
        return accel.choose(self.image(), self._cache_dir)

    def boot(
        self, plan: Plan, audit: Audit | None = None, *, cgroup_name: str | None = None
    ) -> MicroVM:
        """A VM for ``plan`` (filesystem, resources, network), resumed from the idle snapshot when
        fast start is on (the first call per image and machine boots once to save it).
        ``cgroup_name``: the name of QEMU's cgroup when the plan has memory or CPU limits."""
        info = self.probe()
        if not info.available:
            raise BackendUnavailableError(f"the micro-VM backend is unavailable: {info.reason}")
        guest_network.check(plan.network, info.mechanisms)
        image = self.image()
        machine = machine_for(plan, self.accelerator().name)
        boot = functools.partial(
            MicroVM.boot, plan.filesystem, machine, image, network=plan.network, audit=audit,
            host_limits=limits.for_guest(plan.resources.memory_mb, plan.resources.cpu_percent),
            cgroup_name=cgroup_name,
        )  # fmt: skip
        if not self._fast_start:
            return boot()
        saved = snapshot.ensure(image, machine, self._cache_dir)
        try:
            return boot(snapshot=saved)
        except PolicyError:
            raise  # a limit this host cannot set: not the snapshot's fault
        except CorralError:
            os.unlink(saved)  # a snapshot this QEMU cannot load: boot cold, save anew next time
            return boot()

    def launch(self, plan: Plan, options: LaunchOptions) -> SandboxProcess:
        """One shot: boot, run the plan's command, and shut the VM down when the handle closes."""
        vm = self.boot(plan, options.audit)
        try:
            proc = vm.exec(
                plan.command,
                cwd=plan.cwd,
                env=plan.env,
                timeout_ms=plan.timeout_ms,
                options=options,
            )
        except BaseException:
            vm.shutdown()
            raise
        proc.add_close_callback(vm.shutdown)
        return proc


def machine_for(plan: Plan, accelerator: str) -> Machine:
    """Guest RAM and vCPUs from ``corral.resources``; limits a VM cannot enforce are refused."""
    res = plan.resources
    if res.pids:
        raise PolicyError(
            "corral.resources.pids is not enforced in a micro-VM (the guest has its own process table)",
            remediation="drop the pids limit for microvm, or use the process backend",
        )
    memory = res.memory_mb or DEFAULT_MEMORY_MB
    if memory < MIN_MEMORY_MB:
        raise PolicyError(
            f"a micro-VM needs at least {MIN_MEMORY_MB} MiB of memory (asked: {memory})",
            remediation=f"raise corral.resources.memoryMb to {MIN_MEMORY_MB} or more",
        )
    # vCPUs enough for the CPU share; QEMU's cgroup caps their time at exactly that share.
    cpus = math.ceil(res.cpu_percent / 100) if res.cpu_percent else 1
    if cpus > (os.cpu_count() or 1):
        raise PolicyError(f"{cpus} vCPUs asked, the host has {os.cpu_count()} CPUs")
    return Machine(
        accelerator,
        memory,
        cpus,
        nic=plan.network.mode != "none",
        forwards=guest_network.forwards(plan.network),
    )


@functools.cache
def _probe(guest_dir: str, cache_dir: str, minimal_kernel: bool) -> BackendInfo:
    if shutil.which(QEMU) is None:
        return BackendInfo(
            NAME,
            False,
            f"{QEMU} is missing (apt-get install qemu-system-x86)",
            containments=CONTAINMENTS,
        )
    if os.geteuid() != 0:
        return BackendInfo(
            NAME, False, "the micro-VM backend builds QEMU's filesystem view with mounts: run as root",
            containments=CONTAINMENTS,
        )  # fmt: skip
    try:
        image = guest_image(guest_dir, cache_dir, prefer_minimal=minimal_kernel)
        chosen = accel.choose(image, cache_dir)
    except CorralError as exc:
        reason = exc.message + (f" ({exc.remediation})" if exc.remediation else "")
        return BackendInfo(NAME, False, reason, containments=CONTAINMENTS)
    mechanisms = {
        "hypervisor": f"{QEMU} -M microvm, accel={chosen.name}: {chosen.detail}; guest {image.kernel_version}"
        + (
            "; guest runs with norandmaps and mitigations=off (TCG: see docs/microvm.md)"
            if chosen.name == "tcg"
            else ""
        ),
        "guest-filesystem": "virtio-9p export of a staged root: read-only binds for read-only grants",
        "mount-namespace": "QEMU runs in a private mount namespace holding only the granted paths "
        "(denied paths covered), the 9p export's sole source",
        "network-namespace": "QEMU runs in a private network namespace; the guest has no "
        "network device unless the plan has network rules",
        "guest-memory": "guest RAM = corral.resources.memoryMb (default 256 MiB); QEMU in a "
        f"memory cgroup of that + {limits.QEMU_OVERHEAD_MB} MiB",
        "guest-cpus": "vCPUs = corral.resources cpu / 100, rounded up; QEMU's CPU time capped "
        "at that share by a cpu cgroup",
        **guest_network.mechanisms(),
    }
    return BackendInfo(NAME, True, mechanisms=mechanisms, containments=CONTAINMENTS)
