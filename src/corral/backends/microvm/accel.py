"""Which accelerator QEMU can really use here: KVM only if a guest actually boots under it.

/dev/kvm existing proves little (this machine kind's /dev/kvm is a paravirtual PVM hypervisor
on which stock guest kernels crawl or crash), so the probe boots the real guest with
``-accel kvm`` under a short deadline and falls back to TCG. The verdict is cached per host boot
(the boot id is part of the key) in the image cache, so every run directory shares it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

from corral.backends.microvm.image import GuestImage
from corral.errors import CorralError

KVM_BOOT_DEADLINE = 8.0  # a KVM guest boots in well under a second; TCG here takes ~3 s


@dataclass(frozen=True)
class Accelerator:
    name: str  # "kvm" | "tcg"
    detail: str


def choose(image: GuestImage, cache_dir: str) -> Accelerator:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return Accelerator("tcg", "software emulation (KVM unusable: no accessible /dev/kvm)")
    cache = os.path.join(cache_dir, f"accel-{_cache_key(image)}.json")
    try:
        with open(cache) as f:
            saved = json.load(f)
        return Accelerator(str(saved["name"]), str(saved["detail"]))
    except (OSError, ValueError, KeyError):
        pass
    verdict = _try_kvm(image)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{cache}.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"name": verdict.name, "detail": verdict.detail}, f)
    os.replace(tmp, cache)
    return verdict


def _try_kvm(image: GuestImage) -> Accelerator:
    from corral.backends.microvm.qemu import Machine
    from corral.backends.microvm.vm import MicroVM
    from corral.policy.filesystem import FilesystemPolicy

    try:
        vm = MicroVM.boot(
            FilesystemPolicy((), ()), Machine("kvm", 256, 1), image, boot_timeout=KVM_BOOT_DEADLINE
        )
    except CorralError as exc:
        reason = exc.message.splitlines()[0][:200]
        return Accelerator(
            "tcg", f"software emulation (KVM unusable: a probe guest failed: {reason})"
        )
    vm.shutdown()
    return Accelerator("kvm", "hardware virtualisation (KVM; a probe guest booted)")


def _cache_key(image: GuestImage) -> str:
    """Per host boot, host kernel and guest image: any of them can change the verdict."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        boot_id = f.read().strip()
    text = "|".join((boot_id, os.uname().release, image.kernel_version, image.initramfs))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
