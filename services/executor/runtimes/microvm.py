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
from pathlib import Path

from qemu.qmp import QMPClient

from services.executor.channel import GuestChannel
from services.executor.runtime import Guest, LaunchSpec, RuntimeError_

QEMU = "qemu-system-x86_64"
HELLO_TIMEOUT = 20.0
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
        f"socket,id=ch0,path={sockets / 'channel.sock'},server=on,wait=off",
        "-device",
        "virtio-serial-device",
        "-device",
        "virtserialport,chardev=ch0,nr=1",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-qmp",
        f"unix:{sockets / 'qmp.sock'},server=on,wait=off",
        *(extra or []),
    ]


async def wait_for_socket(path: Path, process: asyncio.subprocess.Process) -> None:
    """QEMU creates its sockets a few ms after start; wait for them (or for QEMU to die)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SOCKET_WAIT
    while not path.exists():
        if process.returncode is not None:
            raise RuntimeError_(f"QEMU exited with code {process.returncode} before {path.name}")
        if loop.time() > deadline:
            raise RuntimeError_(f"QEMU did not create {path} within {SOCKET_WAIT:g} s")
        await asyncio.sleep(0.002)


class MicrovmRuntime:
    """Runs guests as unikernels in QEMU microvm with the given accelerator."""

    name = "microvm"
    whole_image = False

    def __init__(self, accel: str) -> None:
        self.accel = accel

    async def spawn(self, spec: LaunchSpec, extra: list[str] | None = None) -> Guest:
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
            raise RuntimeError_(f"cannot start {QEMU}: {exc}") from exc
        finally:
            log.close()
        try:
            await wait_for_socket(sockets / "channel.sock", process)
            reader, writer = await asyncio.open_unix_connection(str(sockets / "channel.sock"))
            await wait_for_socket(sockets / "qmp.sock", process)
            qmp = QMPClient(f"ferry-{spec.instance}")
            await qmp.connect(str(sockets / "qmp.sock"))
        except Exception as exc:
            await _kill(process)
            shutil.rmtree(sockets, ignore_errors=True)
            raise RuntimeError_(f"{exc}: {_tail(spec.workdir / 'qemu.log')}") from exc
        return Guest(
            channel=GuestChannel(reader, writer),
            pid=process.pid,
            detail={"process": process, "qmp": qmp, "sockets": sockets},
        )

    async def launch(self, spec: LaunchSpec) -> Guest:
        guest = await self.spawn(spec)
        try:
            await asyncio.wait_for(guest.channel.hello(), HELLO_TIMEOUT)
        except Exception as exc:
            await self.terminate(guest)
            raise RuntimeError_(
                f"{spec.app} unikernel did not greet within {HELLO_TIMEOUT:g} s "
                f"({type(exc).__name__}: {exc}); see {spec.workdir / 'console.log'}"
            ) from exc
        return guest

    async def capture(self, guest: Guest, spec: LaunchSpec) -> Path:
        raise RuntimeError_("the microvm runtime moves app-level checkpoints, not whole images")

    async def launch_from(self, spec: LaunchSpec, image_file: Path) -> Guest:
        raise RuntimeError_("the microvm runtime moves app-level checkpoints, not whole images")

    async def resume_captured(self, guest: Guest, spec: LaunchSpec) -> Guest:
        return guest

    async def terminate(self, guest: Guest) -> None:
        await guest.channel.close()
        qmp = guest.detail.pop("qmp", None)
        if isinstance(qmp, QMPClient):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(qmp.execute("quit"), 1.0)
            with contextlib.suppress(Exception):
                await qmp.disconnect()
        process = guest.detail.get("process")
        if not isinstance(process, asyncio.subprocess.Process):
            return
        try:
            await asyncio.wait_for(process.wait(), 2.0)
        except TimeoutError:
            await _kill(process)
        sockets = guest.detail.get("sockets")
        if isinstance(sockets, Path):
            shutil.rmtree(sockets, ignore_errors=True)


def _tail(log: Path, lines: int = 5) -> str:
    """The last lines QEMU wrote, so the error says why it failed."""
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return f"(no {log.name})"


async def _kill(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()
