"""The ``unix`` runtime: the app's unix-target binary as a child process on an inherited fd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from dataclasses import dataclass, field

from services.executor.channel import GuestChannel
from services.executor.runtime import AppLevelRuntime, Guest, GuestRuntimeError, LaunchSpec
from services.executor.runtimes.node import NodeFacts


async def probe(node: NodeFacts) -> UnixRuntime:
    """The unix runtime: any Linux node runs it."""
    return UnixRuntime()


@dataclass
class ProcessGuest(Guest):
    """A unix guest: the child process that runs it."""

    process: asyncio.subprocess.Process = field(kw_only=True)


class UnixRuntime(AppLevelRuntime):
    """Runs guests as plain Linux processes: fastest to start, used for development and tests."""

    name = "unix"

    async def launch(self, spec: LaunchSpec) -> Guest:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log = (spec.workdir / "guest.log").open("ab")
        try:
            process = await asyncio.create_subprocess_exec(
                str(spec.image),
                "--fd",
                str(child.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=(child.fileno(),),
                start_new_session=True,
            )
        except OSError as exc:
            parent.close()
            raise GuestRuntimeError(f"cannot run {spec.image}: {exc}") from exc
        finally:
            child.close()
            log.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        channel = GuestChannel(reader, writer)
        guest = ProcessGuest(channel=channel, pid=process.pid, process=process)
        return await self.greeted(guest, spec)

    async def terminate(self, guest: Guest) -> None:
        await guest.channel.close()
        if not isinstance(guest, ProcessGuest):
            return
        process = guest.process
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
