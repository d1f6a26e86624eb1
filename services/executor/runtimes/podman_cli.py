"""Podman + CRIU: the container runtime Ferry benchmarks against and can migrate with.

Only what Ferry needs: a local image from one static binary (with the same ID on every node, so
a checkpoint taken on one node restores on another), rootful containers on host networking,
checkpoint to a portable archive and restore from it (also under a new name, on another node).
Measured facts and the exact commands are in PODMAN.md beside this file.

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
import platform
import re
import shlex
import shutil
import socket
import tarfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "CheckpointOrigin",
    "CheckpointResult",
    "PodmanError",
    "RestoreResult",
    "become_subreaper",
    "build_image",
    "checkpoint_export",
    "checkpoint_origin",
    "criu_available",
    "free_port",
    "remove",
    "restore_import",
    "run",
]

CRIU_MIN_VERSION = (4, 1)
#: Root here lacks CAP_SYS_RESOURCE, so the container may not inherit podman's higher defaults.
ULIMITS = ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=32768:32768")
#: Image label holding the sha256 of the binary an image was built from.
BINARY_LABEL = "ferry.binary.sha256"
LISTEN_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 180.0
_STDERR_TAIL_LINES = 15
_PR_SET_CHILD_SUBREAPER = 36
_REAP_INTERVAL_S = 0.2
#: Image config times: fixed, so that the image ID depends on the binary alone.
_EPOCH = "1970-01-01T00:00:00Z"
#: platform.machine() -> the OCI architecture name.
_ARCH = {"x86_64": "amd64", "aarch64": "arm64"}


class PodmanError(Exception):
    """A podman, criu or tar command failed; carries what is needed to tell why."""

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
class CheckpointOrigin:
    """What a checkpoint archive was taken from, read from the archive itself."""

    #: The image the container ran; a restore needs exactly this ID in local storage.
    image_id: str
    #: The container's command (entrypoint arguments), as given to `run`.
    command: list[str]


@dataclass(frozen=True)
class RestoreResult:
    name: str
    #: From the start of the restore command until the service's port is listening again.
    seconds: float


async def _exec(cmd: Sequence[str], stdin: bytes | None = None) -> tuple[int, str, str]:
    """Run a command; a hung podman/CRIU becomes an error after COMMAND_TIMEOUT_S, not a hang."""
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), COMMAND_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise PodmanError(
            list(cmd), -1, f"no answer within {COMMAND_TIMEOUT_S:g} s (killed)"
        ) from None
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


async def build_image(binary: Path, tag: str) -> str:
    """Makes `tag` (a full `name:tag` reference) an image whose only file is `binary`, run as its
    entrypoint; returns the image's ID. A no-op when `tag` already is that image.

    The ID is the same on every node for the same binary, which a restore needs: a checkpoint
    names the ID of its image, and `container restore --import` fails on a node without it
    (`creating container storage: parsing named reference "<id>"`). That is why the image is a
    docker-archive built here and `podman load`ed, not `podman import`ed (import stamps the
    current time into the config, so every node gets a different ID). The label BINARY_LABEL
    records the binary's sha256. Raises PodmanError if `podman load` fails, OSError if `binary`
    cannot be read.
    """
    archive, image_id = await asyncio.to_thread(_image_archive, binary, tag)
    if await _image_id(tag) == image_id:
        return image_id
    await _podman("load", stdin=archive)
    loaded = await _image_id(tag)
    if loaded != image_id:
        raise PodmanError(
            ("podman", "load"), None, f"{tag} is image {loaded}, expected {image_id} after load"
        )
    return image_id


async def _image_id(reference: str) -> str | None:
    code, out, _ = await _exec(("podman", "image", "inspect", "--format", "{{.Id}}", reference))
    return out.strip() if code == 0 else None


def _image_archive(binary: Path, tag: str) -> tuple[bytes, str]:
    """A docker-archive holding `binary` as the image's only file and tagged `tag`, and the ID.

    Everything in it (file times, owner, config, history) is fixed or derived from the binary's
    bytes, so the ID (the sha256 of the config) is too.
    """
    data = binary.read_bytes()
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo(binary.name)
        info.size, info.mode, info.mtime = len(data), 0o755, 0
        tar.addfile(info, io.BytesIO(data))
    layer_bytes = layer.getvalue()
    layer_digest = hashlib.sha256(layer_bytes).hexdigest()
    config = {
        "architecture": _ARCH.get(platform.machine(), platform.machine()),
        "os": "linux",
        "created": _EPOCH,
        "config": {
            "Entrypoint": [f"/{binary.name}"],
            "Labels": {BINARY_LABEL: hashlib.sha256(data).hexdigest()},
        },
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]},
        "history": [{"created": _EPOCH, "created_by": "ferry: the app's static binary"}],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    image_id = hashlib.sha256(config_bytes).hexdigest()
    manifest = [
        {
            "Config": f"{image_id}.json",
            "RepoTags": [tag],
            "Layers": [f"{layer_digest}/layer.tar"],
        }
    ]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, body in (
            (f"{layer_digest}/layer.tar", layer_bytes),
            (f"{image_id}.json", config_bytes),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(body), 0
            tar.addfile(info, io.BytesIO(body))
    return out.getvalue(), image_id


def free_port() -> int:
    """A TCP port free on 127.0.0.1 a moment ago, for `run` (host networking: a host port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
            await remove(name, quiet=True)
        raise
    return RestoreResult(name, time.perf_counter() - started)


async def remove(name: str, *, quiet: bool = False) -> None:
    """Kills and removes `name` at once (PID 1 in a container ignores SIGTERM); absent is fine.

    `quiet`: swallow a failure instead of raising PodmanError, for cleanup on a path that is
    already reporting another error.
    """
    try:
        await _podman("rm", "--force", "--time", "0", "--ignore", name)
    except PodmanError:
        if not quiet:
            raise


async def checkpoint_origin(archive: Path) -> CheckpointOrigin:
    """The image ID and command of the container `archive` (from checkpoint_export) was taken of.

    Both come from the archive's `config.dump` (podman's container config). GNU tar detects the
    compression (zstd needs the `zstd` program). Raises PodmanError if the archive cannot be read
    or holds no such config (returncode None: it was read, but is not a podman checkpoint).
    """
    cmd = ("tar", "-xOf", str(archive), "config.dump")
    code, out, err = await _exec(cmd)
    if code != 0:
        raise PodmanError(cmd, code, err)
    try:
        config = json.loads(out)
        return CheckpointOrigin(str(config["rootfsImageID"]), [str(a) for a in config["command"]])
    except (ValueError, KeyError, TypeError) as exc:
        raise PodmanError(
            cmd, None, f"not a podman checkpoint: {type(exc).__name__}: {exc}"
        ) from exc


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
    its own children within milliseconds, so their exit status is never stolen. Calling it again
    does nothing.
    """
    global _reaper_started
    if _reaper_started:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(errno)}")
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
