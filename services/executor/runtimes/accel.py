"""Choosing QEMU's accelerator: KVM only where it really runs guest code at native speed.

``/dev/kvm`` existing proves nothing: on a nested host (e.g. KVM via ``kvm_pvm``) ring-0 guest code
is emulated ~1000x slower, and a unikernel runs entirely at ring 0. So ``auto`` boots a tiny probe
guest that spins a fixed loop and exits, under KVM and under TCG, and keeps KVM only if it wins.
The probe is generated here (a PVH ELF of a few hundred bytes), so no build step is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
import tempfile
import time
from pathlib import Path

LOAD_ADDRESS = 0x100000
SPIN_ITERATIONS = 20_000_000
PROBE_TIMEOUT = 5.0


def probe_image() -> bytes:
    """A PVH-bootable ELF64 whose 32-bit entry spins, then exits QEMU via isa-debug-exit."""
    code = (
        b"\xb9"
        + struct.pack("<I", SPIN_ITERATIONS)  # mov ecx, N
        + b"\x49"  # dec ecx
        + b"\x75\xfd"  # jnz -3
        + b"\xb0\x00"  # mov al, 0
        + b"\xe6\xf4"  # out 0xf4, al  (isa-debug-exit: QEMU exits with 1)
        + b"\xf4"  # hlt
        + b"\xeb\xfd"  # jmp -3
    )
    ehdr_size, phdr_size = 64, 56
    note_offset = ehdr_size + 2 * phdr_size
    note = struct.pack("<III", 4, 8, 18) + b"Xen\x00"  # XEN_ELFNOTE_PHYS32_ENTRY
    code_offset = note_offset + len(note) + 8
    entry = LOAD_ADDRESS + code_offset
    note += struct.pack("<Q", entry)
    total = code_offset + len(code)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr = ident + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, entry, ehdr_size, 0, 0, ehdr_size, phdr_size, 2, 0, 0, 0
    )
    load = struct.pack("<IIQQQQQQ", 1, 5, 0, LOAD_ADDRESS, LOAD_ADDRESS, total, total, 0x1000)
    note_hdr = struct.pack(
        "<IIQQQQQQ", 4, 4, note_offset, LOAD_ADDRESS + note_offset, 0, len(note), len(note), 4
    )
    return ehdr + load + note_hdr + note + code


async def time_probe(accel: str, image: Path, timeout: float = PROBE_TIMEOUT) -> float | None:
    """Seconds from spawn to the probe's exit under ``accel``, or None if it failed/timed out."""
    started = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        "qemu-system-x86_64",
        "-M",
        "microvm",
        "-accel",
        accel,
        "-m",
        "16",
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-kernel",
        str(image),
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        code = await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        return None
    return time.perf_counter() - started if code == 1 else None


async def choose_accel(setting: str) -> tuple[str, str]:
    """The accelerator to use and why, for an ``accel`` setting of auto, kvm or tcg."""
    if setting in ("kvm", "tcg"):
        return setting, "configured"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "no usable /dev/kvm"
    with tempfile.TemporaryDirectory(prefix="ferry-accel-") as scratch:
        image = Path(scratch) / "probe.elf"
        image.write_bytes(probe_image())
        tcg = await time_probe("tcg", image)
        if tcg is None:
            return "tcg", "probe guest failed under TCG; KVM not trusted either"
        # KVM only matters if it beats TCG: no need to wait longer than TCG took.
        kvm_budget = max(0.5, 1.5 * tcg)
        kvm = await time_probe("kvm", image, kvm_budget)
    if kvm is None:
        return "tcg", f"probe: TCG {tcg * 1000:.0f} ms, KVM failed or took > {kvm_budget:.1f} s"
    if kvm <= tcg:
        return "kvm", f"probe: KVM {kvm * 1000:.0f} ms <= TCG {tcg * 1000:.0f} ms"
    return "tcg", f"probe: KVM {kvm * 1000:.0f} ms slower than TCG {tcg * 1000:.0f} ms"
