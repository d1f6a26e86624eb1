"""Detached child processes: spawn into their own session, check them, stop them by group.

Why ``subprocess.Popen`` and not ``asyncio.create_subprocess_exec``: an asyncio subprocess
transport kills its child when it is closed or garbage-collected, and the stack's children must
outlive the ``ferry up`` process that started them. Spawning is a fork+exec and does not block
the event loop noticeably; all waiting in this module is done with ``asyncio.sleep`` polling.

``die_with_parent`` is for stacks owned by one process (the test suite's): the kernel signals the
child when the spawning process dies, even of SIGKILL (``prctl(PR_SET_PDEATHSIG)``), so a killed
test run leaves no broker or Swift server holding its ports. ``ferry up`` does not use it: its
stack must outlive the command.

A process is identified by its pid *and* its start time in clock ticks since boot (field 22 of
``/proc/PID/stat``), so a pid recycled by the kernel after a crash is never mistaken for ours.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path


@dataclass
class ProcessHandle:
    """One spawned component; ``popen`` is set only in the process that spawned it."""

    name: str
    pid: int
    start_ticks: int
    started_at: str
    log: Path
    argv: list[str]
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)

    def alive(self) -> bool:
        """True while the process runs (a zombie or a recycled pid counts as gone)."""
        if self.popen is not None and self.popen.poll() is not None:
            return False
        return is_alive(self.pid, self.start_ticks)

    def exit_code(self) -> int | None:
        """The exit status if we spawned it and it has ended, else None."""
        return None if self.popen is None else self.popen.poll()


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(sig: signal.Signals = signal.SIGKILL) -> Callable[[], None]:
    """A ``preexec_fn`` that makes the child get ``sig`` when this process (strictly: the
    spawning thread) ends, however it ends. Resolved here, before the fork, so the child only
    makes one system call; a child whose parent already died kills itself instead of staying."""
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        if prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0 or os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def spawn_detached(
    name: str,
    argv: Sequence[str],
    log: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    *,
    die_with_parent_signal: signal.Signals | None = None,
) -> ProcessHandle:
    """Start ``argv`` in a new session with stdout+stderr appended to ``log``.

    The new session makes the child its own process-group leader (pgid == pid), which is what
    ``stop_group`` signals, and detaches it from our terminal so Ctrl-C on ``ferry up`` does not
    reach it. With ``die_with_parent_signal`` the child also gets that signal when we die (see
    the module docstring). Raises OSError when the program cannot be executed.
    """
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        stamp = datetime.now(UTC).isoformat(timespec="seconds")
        out.write(f"--- ferry: {stamp} starting {name}: {' '.join(argv)}\n".encode())
        out.flush()
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            preexec_fn=(
                die_with_parent(die_with_parent_signal) if die_with_parent_signal else None
            ),
        )
    ticks = start_ticks(popen.pid)
    return ProcessHandle(
        name=name,
        pid=popen.pid,
        start_ticks=ticks if ticks is not None else 0,
        started_at=datetime.now(UTC).isoformat(timespec="milliseconds"),
        log=log,
        argv=list(argv),
        popen=popen,
    )


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it does not exist."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def is_alive(pid: int, ticks: int) -> bool:
    """True if ``pid`` runs, is not a zombie, and started at ``ticks`` (0 skips that check)."""
    _reap(pid)
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return ticks == 0 or int(fields[19]) == ticks


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids whose process group is ``pgid``; children of children included."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            members.append(int(entry.name))
    return members


async def stop_group(handle: ProcessHandle, grace: float) -> None:
    """SIGTERM the handle's process group, then SIGKILL whatever is left after ``grace`` seconds.

    Returns once the group is empty. Does nothing if the leader's pid now belongs to another
    process (recycled pid) or the group is already gone.
    """
    leader = _stat_fields(handle.pid)
    if leader is not None and handle.start_ticks and int(leader[19]) != handle.start_ticks:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not _signal_group(handle.pid, sig):
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if handle.popen is not None:
                handle.popen.poll()
            if not group_members(handle.pid):
                return
            await asyncio.sleep(0.05)
    if handle.popen is not None:
        handle.popen.poll()


def tail(path: Path, lines: int = 20) -> list[str]:
    """The last ``lines`` lines of a log file (empty if it does not exist)."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except FileNotFoundError:
        return []
    return data.decode(errors="replace").splitlines()[-lines:]


def _signal_group(pgid: int, sig: signal.Signals) -> bool:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    return True


def _reap(pid: int) -> None:
    """Collect ``pid`` if it is our own exited child, so it does not linger as a zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [0] is state, [2] pgrp, [19] start."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(b")") + 2 :].decode().split()
