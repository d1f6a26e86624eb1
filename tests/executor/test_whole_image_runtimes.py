"""The whole-image runtimes (``microvm-snapshot``, ``podman``) on real QEMU (TCG) and real
podman + CRIU: a counter guest is launched, fed, captured, rebuilt in another workdir by another
runtime object (as another node would), and must continue counting exactly where it stopped;
the rollback path (capture, then resume the source) must do the same. Nothing is mocked.

Run with ``-s`` to see the measured image sizes and times.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from services.executor.channel import FrameType, GuestChannel
from services.executor.runtime import Guest, GuestRuntimeError, LaunchSpec
from services.executor.runtimes.microvm_snapshot import SnapshotRuntime
from services.executor.runtimes.podman import PodmanRuntime, container_name, podman_available

EVENT_TIMEOUT = 20.0


async def feed(channel: GuestChannel, seqs: range, source: str = "sensor") -> list[int | None]:
    """Send one INPUT per seq; return each input's ``total`` output (None: dropped as a dup)."""
    for seq in seqs:
        channel.send_input(source, seq, {"value": seq})
    await channel.drain()
    totals: list[int | None] = []
    pending: int | None = None
    while len(totals) < len(seqs):
        frame = await asyncio.wait_for(channel.next_event(), EVENT_TIMEOUT)
        body = frame.json()
        if frame.type is FrameType.OUTPUT:
            pending = body["payload"]["total"]
        elif frame.type is FrameType.DONE:
            assert body["seq"] == seqs[len(totals)]
            totals.append(pending if body["applied"] else None)
            pending = None
        elif frame.type in (FrameType.ERROR, FrameType.EXITED):
            raise AssertionError(f"guest failed: {frame.type.name} {body}")
    return totals


def spec_for(tmp_path: Path, node: str, instance: str, image: Path) -> LaunchSpec:
    workdir = tmp_path / node / instance
    workdir.mkdir(parents=True)
    return LaunchSpec("svc", instance, "counter", image, workdir, memory_mb=64)


# -- microvm-snapshot -------------------------------------------------------------------------


@pytest.fixture
def counter_elf(unikernel_builds: Path) -> Path:
    return unikernel_builds / "microvm" / "counter.elf"


@pytest.fixture
async def vms() -> AsyncIterator[list[tuple[SnapshotRuntime, Guest]]]:
    """Guests to terminate after the test, whatever happened."""
    started: list[tuple[SnapshotRuntime, Guest]] = []
    yield started
    for runtime, guest in started:
        await runtime.terminate(guest)


async def started_vm(
    runtime: SnapshotRuntime, spec: LaunchSpec, vms: list[tuple[SnapshotRuntime, Guest]]
) -> Guest:
    guest = await runtime.launch(spec)
    vms.append((runtime, guest))
    assert (await guest.channel.start({}))["step"] == "input"
    assert await feed(guest.channel, range(1, 6)) == [1, 2, 3, 4, 5]
    return guest


@pytest.mark.parametrize("prepared", [False, True], ids=["cold-target", "prepared-target"])
async def test_snapshot_moves_to_another_node(
    tmp_path: Path, counter_elf: Path, vms: list[tuple[SnapshotRuntime, Guest]], prepared: bool
) -> None:
    source, target = SnapshotRuntime("tcg"), SnapshotRuntime("tcg")
    spec_a = spec_for(tmp_path, "edge-a", "c1", counter_elf)
    spec_b = spec_for(tmp_path, "edge-b", "c2", counter_elf)
    guest = await started_vm(source, spec_a, vms)
    if prepared:
        await target.prepare(spec_b)

    t0 = time.perf_counter()
    image = await source.capture(guest, spec_a)
    t1 = time.perf_counter()
    moved = await target.launch_from(spec_b, image)
    vms.append((target, moved))
    totals = await feed(moved.channel, range(6, 9))
    t2 = time.perf_counter()
    print(
        f"\nmicrovm-snapshot ({'prepared' if prepared else 'cold'} target): "
        f"{image.stat().st_size} B for 64 MiB, capture {1000 * (t1 - t0):.0f} ms, "
        f"restore + 3 inputs {1000 * (t2 - t1):.0f} ms"
    )
    assert image.parent == spec_a.workdir
    assert totals == [6, 7, 8]
    assert await feed(moved.channel, range(3, 4)) == [None]  # the watermark moved too
    assert moved.channel.alive


async def test_snapshot_rollback_resumes_the_source(
    tmp_path: Path, counter_elf: Path, vms: list[tuple[SnapshotRuntime, Guest]]
) -> None:
    runtime = SnapshotRuntime("tcg")
    spec = spec_for(tmp_path, "edge-a", "c1", counter_elf)
    guest = await started_vm(runtime, spec, vms)
    await runtime.capture(guest, spec)
    resumed = await runtime.resume_captured(guest, spec)
    assert await feed(resumed.channel, range(6, 9)) == [6, 7, 8]
    # a second capture of the same guest works as well (a retried migration)
    image = await runtime.capture(resumed, spec)
    moved = await runtime.launch_from(spec_for(tmp_path, "edge-b", "c2", counter_elf), image)
    vms.append((runtime, moved))
    assert await feed(moved.channel, range(9, 10)) == [9]


async def test_snapshot_refuses_a_broken_image(
    tmp_path: Path, counter_elf: Path, vms: list[tuple[SnapshotRuntime, Guest]]
) -> None:
    runtime = SnapshotRuntime("tcg")
    spec = spec_for(tmp_path, "edge-b", "c2", counter_elf)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a migration stream" * 100)
    with pytest.raises(GuestRuntimeError):
        await runtime.launch_from(spec, junk)
    await runtime.prepare(spec)
    with pytest.raises(GuestRuntimeError):
        await runtime.launch_from(spec, junk)
    await runtime.unprepare(spec)  # nothing left: idempotent


# -- podman ------------------------------------------------------------------------------------


@pytest.fixture
async def counter_binary(unikernel_builds: Path) -> Path:
    ok, reason = await podman_available()
    if not ok:
        pytest.skip(f"podman runtime unavailable: {reason}")
    return unikernel_builds / "unix" / "counter"


@pytest.fixture
async def containers() -> AsyncIterator[list[tuple[PodmanRuntime, Guest]]]:
    started: list[tuple[PodmanRuntime, Guest]] = []
    yield started
    for runtime, guest in started:
        await runtime.terminate(guest)


async def started_container(
    runtime: PodmanRuntime, spec: LaunchSpec, containers: list[tuple[PodmanRuntime, Guest]]
) -> Guest:
    guest = await runtime.launch(spec)
    containers.append((runtime, guest))
    assert (await guest.channel.start({}))["step"] == "input"
    assert await feed(guest.channel, range(1, 6)) == [1, 2, 3, 4, 5]
    return guest


async def podman_out(*args: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        "podman", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, f"podman {' '.join(args)}: {err.decode()}"
    return out.decode()


async def running_containers() -> list[str]:
    return (await podman_out("ps", "--format", "{{.Names}}")).split()


async def counter_image_ids() -> list[str]:
    """IDs of the counter images the podman runtime built (one per binary)."""
    listing = await podman_out(
        "image", "ls", "-q", "--no-trunc", "--filter", "reference=localhost/ferry-counter"
    )
    return sorted(set(listing.split()))


async def test_podman_moves_to_another_node(
    tmp_path: Path, counter_binary: Path, containers: list[tuple[PodmanRuntime, Guest]]
) -> None:
    source, target = PodmanRuntime(), PodmanRuntime()
    spec_a = spec_for(tmp_path, "edge-a", "p1", counter_binary)
    spec_b = spec_for(tmp_path, "edge-b", "p2", counter_binary)
    guest = await started_container(source, spec_a, containers)

    t0 = time.perf_counter()
    archive = await source.capture(guest, spec_a)
    t1 = time.perf_counter()
    # Another node has no copy of the source's image: drop it (and the stopped source, which
    # holds it) so the target must rebuild it from the binary, with the same image ID.
    await source.terminate(guest)
    image_ids = await counter_image_ids()
    await podman_out("rmi", *image_ids)
    await target.prepare(spec_b)
    t2 = time.perf_counter()
    moved = await target.launch_from(spec_b, archive)
    containers.append((target, moved))
    totals = await feed(moved.channel, range(6, 9))
    t3 = time.perf_counter()
    print(
        f"\npodman: archive {archive.stat().st_size} B, capture {1000 * (t1 - t0):.0f} ms, "
        f"restore + 3 inputs {1000 * (t3 - t2):.0f} ms"
    )
    assert totals == [6, 7, 8]
    assert await feed(moved.channel, range(3, 4)) == [None]
    running = await running_containers()
    assert container_name("p2") in running and container_name("p1") not in running
    assert await counter_image_ids() == image_ids


async def test_podman_rollback_resumes_the_source(
    tmp_path: Path, counter_binary: Path, containers: list[tuple[PodmanRuntime, Guest]]
) -> None:
    runtime = PodmanRuntime()
    spec = spec_for(tmp_path, "edge-a", "p1", counter_binary)
    guest = await started_container(runtime, spec, containers)
    await runtime.capture(guest, spec)
    assert container_name("p1") not in await running_containers()
    resumed = await runtime.resume_captured(guest, spec)
    containers.append((runtime, resumed))
    assert await feed(resumed.channel, range(6, 9)) == [6, 7, 8]
