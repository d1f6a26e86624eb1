"""``ferry run``: one app build driven directly from stdin to stdout, without the stack.

An app author's local loop: inputs in the wire format of ``ferry/v1/apps/{service}/in`` (one JSON
object per line) go to a guest launched by the executor's own runtimes, and its outputs come back
in the wire format of ``.../out``. ``--checkpoint-at N`` moves the app's state after N inputs (a
checkpoint, a fresh guest, a restore), as a migration does, so the author can check that an
interrupted run gives the same outputs as an uninterrupted one before deploying.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path
from typing import IO, Any

import orjson

from services.common import contract, images, params, topics
from services.common.bus import now_ms
from services.common.config import FerryConfig
from services.common.contract import ContractError
from services.executor import guest_log
from services.executor.channel import ChannelError, Frame, FrameType, GuestError
from services.executor.instance import output_message, sequence_of
from services.executor.runtime import Guest, GuestRuntimeError, LaunchSpec, Runtime
from services.executor.runtimes import available_runtimes
from tools.cli.output import err

#: The service and node names a local run's outputs carry.
LOCAL = "local"


class GuestFailed(Exception):
    """The guest died or refused a request; the message says why (and its last log lines)."""


class LocalRun:
    """One guest at a time (a fresh one after each --checkpoint-at move), its outputs on ``out``."""

    def __init__(
        self, runtime: Runtime, spec: LaunchSpec, typed: dict[str, Any], out: IO[str]
    ) -> None:
        self.runtime = runtime
        self.spec = spec
        self.params = typed
        self.out = out
        self.guest: Guest | None = None
        self.finished = asyncio.Event()
        self.outputs = 0
        self.error: str | None = None
        #: Procedural apps: set at the output after which --checkpoint-at moves the state.
        self.move_at: int | None = None
        self.move_due = asyncio.Event()

    def _on_event(self, frame: Frame) -> None:
        if frame.type is FrameType.OUTPUT:
            output = output_message(LOCAL, LOCAL, frame.json())
            self.out.write(orjson.dumps(output).decode() + "\n")
            self.outputs += 1
            if self.outputs == self.move_at:
                self.move_due.set()
        elif frame.type is FrameType.LOG:
            err.print(f"guest: {frame.json().get('msg')}", markup=False)
        elif frame.type is FrameType.ERROR:
            body = frame.json()
            self.error = f"{body.get('code')}: {body.get('message')}"
        elif frame.type in (FrameType.FINISHED, FrameType.EXITED):
            self.finished.set()

    @property
    def channel(self) -> Any:
        assert self.guest is not None
        return self.guest.channel

    async def boot(self, document: bytes | None = None) -> None:
        """A fresh guest, started with the params or restored from ``document``."""
        self.finished.clear()
        self.guest = await self.runtime.launch(self.spec)
        self.channel.on_event = self._on_event
        if document is None:
            await self.channel.start(self.params)
        else:
            await self.channel.restore(document)

    def check_alive(self) -> None:
        if self.guest is None or not self.channel.alive or self.channel.exited is not None:
            raise GuestFailed(self.why("the guest exited"))

    def why(self, what: str) -> str:
        exited = self.channel.exited if self.guest is not None else None
        parts = [what]
        if self.error:
            parts.append(self.error)
        if exited:
            parts.append(f"exit code {exited.get('code')}")
        reason = ", ".join(parts)
        for name in ("guest.log", "console.log"):
            last = guest_log.tail(self.spec.workdir / name)
            if last:
                reason += f"\n  last lines of {name}:\n    " + last.replace("\n", "\n    ")
        return reason

    def check_finished(self) -> None:
        """A procedural app that ended without FINISHED failed."""
        exited = self.channel.exited if self.guest is not None else None
        if (exited is not None and exited.get("code") not in (0, None)) or self.error:
            raise GuestFailed(self.why("the guest exited"))

    def send(self, payload: dict[str, Any]) -> None:
        self.check_alive()
        self.channel.send_input(sequence_of(payload), payload["seq"], payload["data"])

    async def move(self) -> int:
        """Checkpoint, stop this guest, restore into a fresh one; the document's size."""
        document: bytes = await self.channel.checkpoint(now_ms(), pause=True)
        await self.end()
        await self.boot(document)
        return len(document)

    async def barrier(self) -> None:
        """Every input sent so far applied and its outputs written (a checkpoint orders them)."""
        self.check_alive()
        await self.channel.checkpoint(now_ms())

    async def end(self) -> None:
        if self.guest is None:
            return
        guest, self.guest = self.guest, None
        try:
            if guest.channel.alive and guest.channel.exited is None:
                await asyncio.wait_for(guest.channel.stop(), 10)
        except (ChannelError, GuestError, TimeoutError):
            pass
        finally:
            await self.runtime.terminate(guest)


def read_input(lineno: int, line: str, topic: str) -> dict[str, Any] | None:
    """One stdin line as an input, or None (after saying why on stderr) if it is not one."""
    try:
        payload = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        err.print(f"line {lineno}: not JSON ({str(exc).split(':')[0]}); skipped", markup=False)
        return None
    try:
        contract.validate(topic, payload)
    except ContractError as exc:
        err.print(f"line {lineno}: not an input: {exc}; skipped", markup=False)
        return None
    assert isinstance(payload, dict)
    return payload


async def run(config: FerryConfig, args: argparse.Namespace) -> int:
    build_dir: Path = args.build_dir
    image = images.build_file(build_dir, args.runtime, args.app)
    if not image.is_file():
        err.print(
            f"error: no {args.runtime} build of {args.app} at {image} "
            "(build it: `make -C unikernel`)",
            markup=False,
        )
        return 2
    raw = params.split(args.param)
    declared: list[dict[str, Any]] | None = None
    hello: dict[str, Any] = {}
    unix_build = images.build_file(build_dir, "unix", args.app)
    if unix_build.is_file():  # the unix build says the same HELLO as the microvm one
        try:
            hello = await asyncio.to_thread(images.read_hello, unix_build)
        except (images.ImageNotFound, OSError, ValueError):
            pass  # the launch below fails the same way and says why, with the guest's log
        else:
            declared = images.declared_params({"app": images.app_info(hello)})
    typed = params.parse(args.app, declared, raw)
    procedural = hello.get("mode") == "procedural"

    wanted = dataclasses.replace(config.executor, runtimes=[args.runtime])
    runtimes, unavailable, _ = await available_runtimes(
        dataclasses.replace(config, executor=wanted)
    )
    if args.runtime not in runtimes:
        why = unavailable.get(args.runtime, "not available here")
        err.print(f"error: the {args.runtime} runtime: {why}", markup=False)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="ferry-run-"))
    spec = LaunchSpec(
        service=LOCAL, instance=f"{LOCAL}.1", app=args.app, image=image, workdir=workdir
    )
    local = LocalRun(runtimes[args.runtime], spec, typed, sys.stdout)
    failed = True
    try:
        code = await (_drive_procedural if procedural else _drive)(local, args)
        failed = False
        return code
    except (GuestFailed, GuestError, ChannelError, GuestRuntimeError) as exc:
        sys.stdout.flush()
        reason = str(exc) if isinstance(exc, GuestFailed) else local.why(str(exc))
        err.print(f"error: {args.app} failed: {reason}", markup=False)
        err.print(f"  the guest's logs are kept in {workdir}", markup=False)
        return 1
    finally:
        await local.end()
        sys.stdout.flush()
        if not failed:
            shutil.rmtree(workdir, ignore_errors=True)


async def _drive(local: LocalRun, args: argparse.Namespace) -> int:
    topic = topics.app_input(LOCAL)
    await local.boot()
    sent = skipped = 0
    lineno = 0
    while True:
        line = await asyncio.to_thread(sys.stdin.readline)
        if not line:
            break
        lineno += 1
        if not line.strip():
            continue
        payload = read_input(lineno, line, topic)
        if payload is None:
            skipped += 1
            continue
        local.send(payload)
        sent += 1
        if args.checkpoint_at is not None and sent == args.checkpoint_at:
            size = await local.move()
            err.print(
                f"checkpoint after {sent} inputs ({size} bytes) restored into a fresh guest",
                markup=False,
            )
        local.out.flush()
    if args.checkpoint_at is not None and sent < args.checkpoint_at:
        err.print(f"only {sent} inputs: no checkpoint taken (--checkpoint-at {args.checkpoint_at})")
    await local.barrier()
    if skipped:
        err.print(f"{skipped} line(s) skipped", markup=False)
    return 0


async def _drive_procedural(local: LocalRun, args: argparse.Namespace) -> int:
    """A procedural app runs its steps on its own (stdin is not read) until FINISHED; with
    --checkpoint-at N its state moves after its Nth output (at the next step boundary)."""
    local.move_at = args.checkpoint_at
    await local.boot()
    finished = asyncio.ensure_future(local.finished.wait())
    try:
        if local.move_at is not None:
            due = asyncio.ensure_future(local.move_due.wait())
            await asyncio.wait({finished, due}, return_when=asyncio.FIRST_COMPLETED)
            due.cancel()
            if local.move_due.is_set() and not local.finished.is_set():
                size = await local.move()
                err.print(
                    f"checkpoint after {local.move_at} outputs ({size} bytes) restored into a "
                    "fresh guest",
                    markup=False,
                )
                finished.cancel()
                finished = asyncio.ensure_future(local.finished.wait())
            else:
                err.print(
                    f"the app finished before a checkpoint after {local.move_at} outputs could be "
                    "taken: nothing moved (its steps ran faster than the checkpoint request)",
                    markup=False,
                )
        await finished
    finally:
        finished.cancel()
    local.check_finished()
    return 0
