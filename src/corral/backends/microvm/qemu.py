"""QEMU's command line for a Corral micro-VM, and the few QMP commands Corral sends."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any

from corral.backends.microvm.image import GuestImage
from corral.errors import BackendUnavailableError, CorralError

QEMU = "qemu-system-x86_64"
AGENT_FD = 3  # the guest agent's channel: one end of a socketpair, passed to QEMU
QMP_FD = 4
NINEP_OPTIONS = "trans=virtio,version=9p2000.L,msize=524288,cache=loose"
# The guest's side of QEMU's user-mode network (guest/init configures it statically). It must
# not overlap slirp4netns's 10.0.2.0/24 in QEMU's network namespace: a guest connection to
# 10.0.2.2 then leaves QEMU as an ordinary socket to 10.0.2.2 (the host's loopback, decided by
# the nftables rules of that namespace), while QEMU's own gateway alias GUEST_GATEWAY only
# reaches the namespace's loopback, where nothing listens.
GUEST_NETWORK = "10.0.3.0/24"
GUEST_GATEWAY = "10.0.3.2"
GUEST_ADDRESS = "10.0.3.15"
# Guest kernel options under TCG only (docs/microvm.md, "Fast start"):
# - norandmaps: TCG caches translated code by guest virtual address; with user-space address
#   randomisation every exec maps libc elsewhere and retranslates it (an exec of a dynamic
#   /bin/true in the guest: ~50 ms with, ~18 ms without). The guest kernel's KASLR stays.
# - mitigations=off: an emulated CPU does not speculate, so the guest's Spectre-class
#   mitigations (retpolines, ...) protect nothing and only cost translation and run time
#   (Debian's kernel: restore-to-command ~550 -> ~450 ms). Under KVM both stay on.
TCG_SPEED_OPTIONS = ("norandmaps", "mitigations=off")


@dataclass(frozen=True)
class Machine:
    accel: str  # "kvm" or "tcg"
    memory_mb: int
    cpus: int
    nic: bool = False  # a virtio-net device on QEMU's user-mode network; none = no network
    # corral.network.publish: (protocol, port) QEMU listens on in its namespace, where
    # slirp4netns delivers the host's published port, and forwards to the same guest port.
    forwards: tuple[tuple[str, int], ...] = ()


def argv(image: GuestImage, machine: Machine, stage_root: str, console_log: str) -> list[str]:
    append = [
        "console=ttyS0", "quiet", "panic=-1", "rdinit=/init", "reboot=t",
        "i8042.noaux", "i8042.nokbd", "8250.nr_uarts=1", "nomodeset", "random.trust_cpu=on",
    ]  # fmt: skip
    if machine.accel == "tcg":
        # Without it the guest calibrates the TSC against emulated timers, slowly and badly.
        append.append(f"tsc_early_khz={host_tsc_khz()}")
        append += TCG_SPEED_OPTIONS
    return [
        QEMU, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot",
        # QEMU's own seccomp filter; spawning stays allowed for snapshots (migration via `cat`).
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,resourcecontrol=deny",
        "-M", "microvm,x-option-roms=off,pit=off,pic=off",
        "-accel", machine.accel,
        "-cpu", "host" if machine.accel == "kvm" else "max",
        "-m", str(machine.memory_mb), "-smp", str(machine.cpus),
        "-kernel", image.kernel, "-initrd", image.initramfs, "-append", " ".join(append),
        "-serial", f"file:{console_log}",
        "-device", "virtio-serial-device",
        "-chardev", f"socket,id=agent,fd={AGENT_FD}",
        "-device", "virtserialport,chardev=agent,name=corral.agent",
        # "none": passthrough that ignores the chown QEMU (running as nobody) may not do.
        "-fsdev", f"local,id=root,path={stage_root},security_model=none,multidevs=remap",
        "-device", "virtio-9p-device,fsdev=root,mount_tag=root",
        "-chardev", f"socket,id=qmp,fd={QMP_FD}",
        "-mon", "chardev=qmp,mode=control",
        *(_nic(machine.forwards) if machine.nic else ()),
    ]  # fmt: skip


def _nic(forwards: tuple[tuple[str, int], ...]) -> list[str]:
    """QEMU's user-mode stack (libslirp): every guest connection becomes a socket of the QEMU
    process in its network namespace, where corral.net's nftables rules and slirp4netns apply.
    IPv4 only, no TFTP or SMB; the guest configures itself statically (QEMU's DHCP goes unused)
    and resolves names through 10.0.2.3, slirp4netns's forwarder, like a process sandbox."""
    netdev = (
        f"user,id=net0,net={GUEST_NETWORK},host={GUEST_GATEWAY},dns=10.0.3.3,"
        "ipv4=on,ipv6=off,dhcpstart=10.0.3.200"
    ) + "".join(f",hostfwd={proto}::{port}-{GUEST_ADDRESS}:{port}" for proto, port in forwards)
    return ["-netdev", netdev, "-device", "virtio-net-device,netdev=net0"]


def host_tsc_khz() -> int:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    raise BackendUnavailableError("cannot read the host CPU frequency from /proc/cpuinfo")


class Qmp:
    """A blocking QMP client over an already connected socket (one command at a time)."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        sock.settimeout(timeout)
        self._file = sock.makefile("rwb")
        self._sock = sock
        self._ready = False

    def command(self, name: str, **arguments: Any) -> Any:
        if not self._ready:  # the handshake waits for the first command: QEMU may not be up yet
            self._ready = True
            self._read()  # greeting
            self.command("qmp_capabilities")
        request: dict[str, Any] = {"execute": name}
        if arguments:
            request["arguments"] = arguments
        self._file.write(json.dumps(request).encode() + b"\n")
        self._file.flush()
        while True:
            reply = self._read()
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise CorralError(f"QEMU refused {name}: {reply['error'].get('desc')}")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise CorralError("QEMU's monitor closed")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def close(self) -> None:
        self._file.close()
        self._sock.close()
