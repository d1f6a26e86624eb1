"""Podman + CRIU: the container runtime Ferry benchmarks against and can migrate with.

Only what Ferry needs: a local image from one static binary, rootful containers on host
networking, checkpoint to a portable archive and restore from it (also under a new name, on
another node). Measured facts and the exact commands are in PODMAN.md beside this file.

Choices (see PODMAN.md for the numbers):
- `--runtime runc`: crun cannot checkpoint here.
- `--network host`: downtime is ~0.4 s shorter than with the bridge network (no netns/NAT to tear
  down and rebuild). The price: the service's port travels inside the checkpoint, so the target
  node must have the same port free, and the service must listen on 0.0.0.0 or 127.0.0.1.
- Established TCP connections are dumped (`--tcp-established`) and come back *closed*
  (`tcp-close` in /etc/criu/runc.conf, written by deploy/install-criu.sh): their peers are on the
  old node anyway; the service sees a reset and accepts its next client.
- Rollback: the checkpoint stops the source container. If the migration fails, the source node
  removes it and restores the same archive under the same name (`remove` + `restore_import`).
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import tarfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CheckpointResult",
    "PodmanError",
    "RestoreResult",
    "become_subreaper",
    "build_image",
    "checkpoint_export",
    "criu_available",
    "remove",
    "restore_import",
    "run",
]

CRIU_MIN_VERSION = (4, 1)
#: Root here lacks CAP_SYS_RESOURCE, so the container may not inherit podman's higher defaults.
ULIMITS = ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768")
#: Image label holding the binary's sha256, so build_image can tell an image is current.
BINARY_LABEL = "ferry.binary.sha256"
LISTEN_TIMEOUT_S = 10.0
_STDERR_TAIL_LINES = 15
_PR_SET_CHILD_SUBREAPER = 36
_REAP_INTERVAL_S = 0.2


class PodmanError(Exception):
    """A podman (or criu) command failed; carries what is needed to tell why."""

    def __init__(self, cmd: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.cmd = list(cmd)
        #: None when the command itself succeeded but its result was wrong (e.g. no listener).
        self.returncode = returncode
        self.stderr_tail = "\n".join(stderr.strip().splitlines()[-_STDERR_TAIL_LINES:])
        status = "failed" if returncode is None else f"exited {returncode}"
        super().__init__(f"`{shlex.join(self.cmd)}` {status}: {self.stderr_tail}")


@dataclass(frozen=True)
class CheckpointResult:
    archive: Path
    size_bytes: int
    #: From the start of the checkpoint command until the archive is complete.
    seconds: float


@dataclass(frozen=True)
class RestoreResult:
    name: str
    #: From the start of the restore command until the service's port is listening again.
    seconds: float


async def _exec(cmd: Sequence[str], stdin: bytes | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


async def _podman(*args: str, stdin: bytes | None = None) -> str:
    """Runs podman; on failure raises PodmanError including the CRIU log's error lines."""
    cmd = ("podman", *args)
    code, out, err = await _exec(cmd, stdin)
    if code != 0:
        raise PodmanError(cmd, code, err + await asyncio.to_thread(_criu_log_errors, err))
    return out


def _criu_log_errors(stderr: str) -> str:
    # podman only says "criu failed ... log file: PATH"; the reason is inside that log.
    match = re.search(r"log file: (\S+)", stderr)
    if match is None:
        return ""
    try:
        lines = Path(match.group(1)).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    errors = [line for line in lines if "Error" in line]
    return "\ncriu log:\n" + "\n".join(errors[-5:]) if errors else ""


async def criu_available() -> tuple[bool, str]:
    """Whether checkpoint/restore can work on this machine, and why not (or the criu version)."""
    if os.geteuid() != 0:
        return False, "rootful podman and criu need root"
    for tool in ("podman", "runc", "criu"):
        if shutil.which(tool) is None:
            return False, f"{tool} is not on PATH (run deploy/install-criu.sh)"
    code, out, err = await _exec(("criu", "--version"))
    match = re.search(r"Version: (\d+)\.(\d+)", out)
    if code != 0 or match is None:
        return False, f"`criu --version` failed: {err.strip() or out.strip()}"
    if (int(match[1]), int(match[2])) < CRIU_MIN_VERSION:
        return False, f"criu {match[1]}.{match[2]} is too old: need >= 4.1 (deploy/install-criu.sh)"
    code, out, err = await _exec(("criu", "check"))
    if code != 0:
        return False, f"`criu check` failed: {(err or out).strip()}"
    return True, f"criu {match[1]}.{match[2]}"


async def build_image(binary: Path, tag: str) -> None:
    """Imports an image whose only file is `binary` (as its entrypoint); no-op if current.

    `podman import` of an in-memory tar needs no registry, no base image and no buildah.
    """
    digest = await asyncio.to_thread(lambda: hashlib.sha256(binary.read_bytes()).hexdigest())
    code, _, _ = await _exec(("podman", "image", "exists", tag))
    if code == 0:
        label_format = f'{{{{index .Labels "{BINARY_LABEL}"}}}}'
        label = await _podman("image", "inspect", "--format", label_format, tag)
        if label.strip() == digest:
            return
    rootfs_tar = await asyncio.to_thread(_single_file_tar, binary)
    entrypoint = json.dumps([f"/{binary.name}"])
    changes = ("--change", f"ENTRYPOINT {entrypoint}", "--change", f"LABEL {BINARY_LABEL}={digest}")
    await _podman("import", *changes, "-", tag, stdin=rootfs_tar)


def _single_file_tar(binary: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tar.gettarinfo(str(binary), arcname=binary.name)
        info.mode, info.uid, info.gid, info.uname, info.gname = 0o755, 0, 0, "root", "root"
        with binary.open("rb") as f:
            tar.addfile(info, f)
    return buf.getvalue()


async def run(name: str, image: str, args: list[str], port: int) -> None:
    """Starts `image` with `args`; returns once the service listens on TCP `port`."""
    runtime = ("--runtime", "runc", "--network", "host", *ULIMITS)
    await _podman("run", "--detach", "--name", name, *runtime, image, *args)
    await _wait_listening(name, port)


async def checkpoint_export(name: str, archive: Path) -> CheckpointResult:
    """Stops `name` and writes its whole state (memory, fds, rootfs changes) to `archive`.

    zstd (podman's default) made the archive ~6x smaller than none and was not slower.
    """
    started = time.perf_counter()
    export = ("--export", str(archive), "--compress", "zstd", "--tcp-established")
    await _podman("container", "checkpoint", *export, name)
    seconds = time.perf_counter() - started
    return CheckpointResult(archive, archive.stat().st_size, seconds)


async def restore_import(archive: Path, name: str, port: int) -> RestoreResult:
    """Restores `archive` as container `name`; returns once it listens on `port` again.

    On failure the half-created container is removed (unless the name belonged to another
    container), so the call can simply be retried.
    `port` is not a mapping (host networking): it is where the service was listening.
    """
    started = time.perf_counter()
    try:
        # --tcp-established is refused together with --name; runc.conf carries it instead.
        await _podman("container", "restore", "--import", str(archive), "--name", name)
        await _wait_listening(name, port)
    except PodmanError as exc:
        if "already in use" not in exc.stderr_tail:
            await remove(name)
        raise
    return RestoreResult(name, time.perf_counter() - started)


async def remove(name: str) -> None:
    """Kills and removes `name` at once (PID 1 in a container ignores SIGTERM); absent is fine."""
    await _podman("rm", "--force", "--time", "0", "--ignore", name)


async def _wait_listening(name: str, port: int) -> None:
    # Watching /proc/net/tcp* (host networking) instead of connecting leaves the service's
    # one-controller-at-a-time channel alone.
    deadline = time.monotonic() + LISTEN_TIMEOUT_S
    while not await asyncio.to_thread(_is_listening, port):
        if time.monotonic() > deadline:
            _, _, logs = await _exec(("podman", "logs", "--tail", "20", name))
            raise PodmanError(
                ("podman", "container", name),
                None,
                f"not listening on TCP port {port} after {LISTEN_TIMEOUT_S:.0f} s; logs:\n{logs}",
            )
        await asyncio.sleep(0.01)


def _is_listening(port: int) -> bool:
    wanted = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and local.endswith(wanted):  # 0A: TCP_LISTEN
                    return True
    return False


_reaper_started = False


def become_subreaper() -> None:
    """Makes this process adopt (and reap) orphans of the processes it starts.

    PID 1 on Ferry's test machines reaps orphans only every ~2 s, and a process restored right
    after a dump on the same host can then fail with "Can't fork for <pid>: File exists". As a
    subreaper, this process inherits podman's orphans (conmon, container processes) and a
    daemon thread reaps them. It only reaps a zombie seen on two polls in a row: asyncio reaps
    its own children within milliseconds, so their exit status is never stolen.
    """
    global _reaper_started
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(errno)}")
    if not _reaper_started:
        threading.Thread(target=_reap_orphans, name="orphan-reaper", daemon=True).start()
        _reaper_started = True


def _reap_orphans() -> None:
    seen: set[int] = set()
    while True:
        zombies = _zombie_children()
        for pid in zombies & seen:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass  # reaped by its own waiter in the meantime
        seen = zombies
        time.sleep(_REAP_INTERVAL_S)


def _zombie_children() -> set[int]:
    zombies = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue  # the thread ended
        for pid in children:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            if stat.rpartition(")")[2].split()[0] == "Z":
                zombies.add(int(pid))
    return zombies
