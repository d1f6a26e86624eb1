"""The ``microvm`` runtime: the app's unikernel image in QEMU ``-M microvm``.

The guest's channel is a virtio-console that QEMU connects to a unix socket (we are the client);
QMP on a second socket controls the VM (``quit`` here; ``stop``/``migrate`` for snapshots).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from qemu.qmp import QMPClient

from services.executor.channel import GuestChannel
from services.executor.runtime import AppLevelRuntime, Guest, GuestRuntimeError, LaunchSpec
from services.executor.runtimes.node import QEMU, NodeFacts

#: The chardev id of the guest channel in ``qemu_argv``.
CHANNEL_ID = "ch0"
SOCKET_WAIT = 10.0


def socket_dir() -> Path:
    """A short private directory for a guest's sockets (unix socket paths must be < 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix="ferry-vm-"))


def qemu_argv(
    spec: LaunchSpec, accel: str, sockets: Path, extra: list[str] | None = None
) -> list[str]:
    """The QEMU command line for one guest (see unikernel/platform/microvm/README.md)."""
    return [
        QEMU,
        "-M",
        "microvm",
        "-accel",
        accel,
        "-m",
        str(spec.memory_mb),
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
        "-kernel",
        str(spec.image),
        "-serial",
        f"file:{spec.workdir / 'console.log'}",
        "-chardev",
        f"socket,id={CHANNEL_ID},path={sockets / 'channel.sock'},server=on,wait=off",
        "-device",
        "virtio-serial-device",
        "-device",
        # A virtserialport (not a virtconsole): QEMU throttles it instead of dropping guest
        # output, and tells the guest when the host connects, so it greets every new controller.
        f"virtserialport,chardev={CHANNEL_ID},nr=1",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-qmp",
        f"unix:{sockets / 'qmp.sock'},server=on,wait=off",
        *(extra or []),
    ]


async def connect_when_listening(
    path: Path, process: asyncio.subprocess.Process
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to a socket QEMU is about to listen on (or fail once QEMU died or took too long).

    QEMU creates the file a moment before it listens, so "refused" is retried too.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SOCKET_WAIT
    while True:
        if process.returncode is not None:
            raise GuestRuntimeError(
                f"QEMU exited with code {process.returncode} before {path.name}"
            )
        try:
            return await asyncio.open_unix_connection(str(path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if loop.time() > deadline:
                raise GuestRuntimeError(
                    f"QEMU did not listen on {path} within {SOCKET_WAIT:g} s"
                ) from exc
        await asyncio.sleep(0.002)


@dataclass
class VmGuest(Guest):
    """A microvm guest: its QEMU process, its QMP connection (None once terminated) and the
    directory of its channel and QMP sockets."""

    process: asyncio.subprocess.Process = field(kw_only=True)
    qmp: QMPClient | None = field(kw_only=True)
    sockets: Path = field(kw_only=True)


async def probe(node: NodeFacts) -> MicrovmRuntime:
    """The microvm runtime with this node's accelerator (Unavailable without QEMU)."""
    return MicrovmRuntime(await node.qemu_accel())


class MicrovmRuntime(AppLevelRuntime):
    """Runs guests as unikernels in QEMU microvm with the given accelerator."""

    name = "microvm"
    log_name = "console.log"

    def __init__(self, accel: str) -> None:
        self.accel = accel

    async def spawn(self, spec: LaunchSpec, extra: list[str] | None = None) -> VmGuest:
        """Start QEMU and connect channel + QMP; does not wait for HELLO."""
        sockets = socket_dir()
        log = (spec.workdir / "qemu.log").open("ab")
        try:
            process = await asyncio.create_subprocess_exec(
                *qemu_argv(spec, self.accel, sockets, extra),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        except OSError as exc:
            shutil.rmtree(sockets, ignore_errors=True)
            raise GuestRuntimeError(f"cannot start {QEMU}: {exc}") from exc
        finally:
            log.close()
        try:
            reader, writer = await connect_when_listening(sockets / "channel.sock", process)
            probe = await connect_when_listening(sockets / "qmp.sock", process)
            probe[1].close()
            qmp = QMPClient(f"ferry-{spec.instance}")
            await qmp.connect(str(sockets / "qmp.sock"))
        except Exception as exc:
            await _kill(process)
            shutil.rmtree(sockets, ignore_errors=True)
            raise GuestRuntimeError(f"{exc}: {tail_log(spec.workdir / 'qemu.log')}") from exc
        return VmGuest(
            channel=GuestChannel(reader, writer),
            pid=process.pid,
            process=process,
            qmp=qmp,
            sockets=sockets,
        )

    async def launch(self, spec: LaunchSpec) -> Guest:
        return await self.greeted(await self.spawn(spec), spec)

    async def terminate(self, guest: Guest) -> None:
        await guest.channel.close()
        if not isinstance(guest, VmGuest):
            return
        qmp, guest.qmp = guest.qmp, None
        if qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(qmp.execute("quit"), 1.0)
            with contextlib.suppress(Exception):
                await qmp.disconnect()
        try:
            await asyncio.wait_for(guest.process.wait(), 2.0)
        except TimeoutError:
            await _kill(guest.process)
        shutil.rmtree(guest.sockets, ignore_errors=True)


def tail_log(log: Path, lines: int = 5) -> str:
    """The last lines QEMU wrote, so the error says why it failed."""
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return f"(no {log.name})"


async def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()
