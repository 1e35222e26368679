"""Fast start: an idle booted guest saved once per (image, machine), resumed instead of booted.

The snapshot is taken before the agent mounts anything (QEMU cannot migrate a mounted 9p
device), so every restore mounts its own plan's view. Restored guests share the saved guest's
memory, including its kernel's random pool: reseed it before trusting guest-side randomness.
"""

from __future__ import annotations

import functools
import hashlib
import os
import subprocess

from corral.backends.microvm import qemu
from corral.backends.microvm.image import GuestImage
from corral.backends.microvm.vm import MicroVM


def ensure(image: GuestImage, machine: qemu.Machine, cache_dir: str) -> str:
    """The path of a snapshot for ``image`` on ``machine``, created (one boot) when missing."""
    path = os.path.join(cache_dir, f"snapshot-{_key(image, machine)}.vmstate")
    if os.path.exists(path):
        return path
    os.makedirs(cache_dir, mode=0o755, exist_ok=True)
    tmp = f"{path}.{os.getpid()}"
    template = MicroVM.boot_idle(machine, image)
    try:
        template.save(tmp)
    finally:
        template.shutdown()
    os.replace(tmp, path)
    return path


def _key(image: GuestImage, machine: qemu.Machine) -> str:
    version = _qemu_version()
    devices = " ".join(qemu.argv(image, machine, "STAGE", "LOG"))  # the shape the state must fit
    parts = (devices, version)
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


@functools.cache
def _qemu_version() -> str:
    """Asked once per process: spawning QEMU costs ~25 ms, a visible part of a restore."""
    return subprocess.run(
        [qemu.QEMU, "--version"], capture_output=True, text=True, timeout=10
    ).stdout
