"""``ferry run``: an app driven locally from stdin, no stack. An interrupted run (checkpoint,
fresh guest, restore) prints the same outputs as an uninterrupted one, for every example app on
both runtimes; bad input lines are named on stderr and skipped, never a traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from services.common import images
from tests.conftest import REPO

APPS = sorted(p.stem for p in (REPO / "unikernel" / "apps").glob("*.c"))
RUNTIMES = ["unix"] + (["microvm"] if shutil.which("qemu-system-x86_64") else [])


def readings() -> str:
    """Inputs from three producers (one with an incarnation), some far above a threshold."""
    lines = []
    for seq in range(1, 31):
        for producer in ("dev-1", "dev-2"):
            value = 20.0 + (seq * 7 + len(producer)) % 13 + (40.0 if seq % 9 == 0 else 0.0)
            lines.append({"producer": producer, "seq": seq, "data": {"value": value}})
        if seq % 3 == 0:
            lines.append(
                {"producer": "dev-3", "seq": seq, "incarnation": 2, "data": {"value": seq * 1.5}}
            )
    lines.append({"producer": "dev-1", "seq": 5, "data": {"value": 99.0}})  # a repeat: dropped
    return "".join(orjson.dumps(line).decode() + "\n" for line in lines)


def ferry_run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "tools.cli", "run", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def outputs(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    """The printed outputs without their wall-clock ``time``."""
    assert done.returncode == 0, done.stderr
    lines = [orjson.loads(line) for line in done.stdout.splitlines()]
    for line in lines:
        assert line["service"] == "local" and line["node"] == "local"
        assert isinstance(line.pop("time"), int)
    return lines


def mode(app: str, builds: Path) -> str:
    return str(images.read_hello(images.build_file(builds, "unix", app))["mode"])


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("app", APPS)
def test_a_checkpoint_mid_run_changes_no_output(
    app: str, runtime: str, unikernel_builds: Path
) -> None:
    procedural = mode(app, unikernel_builds) == "procedural"
    # steps a little apart, so the checkpoint request lands before the last one
    params = ["--param", "rounds=3", "--param", "step_delay_ms=20"] if procedural else []
    stdin = "" if procedural else readings()
    whole = outputs(ferry_run(app, "--runtime", runtime, *params, stdin=stdin))
    assert whole, f"{app} printed nothing"
    if not procedural:
        applied = {(o["producer"], o["seq"]) for o in whole}
        assert (("dev-1", 5) in applied and ("dev-3", 30) in applied) or app == "threshold"
        assert all(o.get("incarnation") == 2 for o in whole if o["producer"] == "dev-3")
    points = (1, len(whole) // 2, len(whole) - 1) if procedural else (1, 17, 40)
    for at in points:
        moved = ferry_run(
            app, "--runtime", runtime, *params, "--checkpoint-at", str(at), stdin=stdin
        )
        assert "restored into a fresh guest" in moved.stderr, moved.stderr
        assert outputs(moved) == whole, f"{app} on {runtime}, checkpoint at {at}"


def test_threshold_answers_only_alerts(unikernel_builds: Path) -> None:
    """An app that does not answer one-to-one still gives the same answers across a move."""
    whole = outputs(ferry_run("threshold", stdin=readings()))
    assert 0 < len(whole) < 60
    moved = outputs(ferry_run("threshold", "--checkpoint-at", "30", stdin=readings()))
    assert moved == whole


def test_bad_lines_are_named_and_skipped(unikernel_builds: Path) -> None:
    good = '{"producer": "dev-1", "seq": %d, "data": {"value": 21.5}}\n'
    stdin = (
        good % 1
        + "not json\n"
        + '{"producer": "dev-1", "seq": "x", "data": {}}\n'
        + "\n"
        + '{"producer": "a/b", "seq": 2, "data": {}}\n'
        + '{"producer": "dev-1", "seq": 2, "data": {}, "extra": 1}\n'
        + "[1, 2]\n"
        + good % 2
    )
    done = ferry_run("counter", stdin=stdin)
    printed = outputs(done)
    assert [(o["producer"], o["seq"], o["data"]["count"]) for o in printed] == [
        ("dev-1", 1, 1),
        ("dev-1", 2, 2),
    ]
    for lineno, word in ((2, "not JSON"), (3, "seq"), (5, "producer"), (6, "extra"), (7, "")):
        assert any(
            line.startswith(f"line {lineno}: ") and word in line
            for line in done.stderr.splitlines()
        ), (lineno, done.stderr)
    assert "line 4" not in done.stderr  # an empty line is not an error
    assert "5 line(s) skipped" in done.stderr


def test_usage_errors_exit_2_and_a_dying_guest_exits_1(
    unikernel_builds: Path, tmp_path: Path
) -> None:
    typo = ferry_run("aggregator", "--param", "windw=8")
    assert typo.returncode == 2 and "no parameter 'windw'" in typo.stderr
    wrong = ferry_run("aggregator", "--param", "window=8.5")
    assert wrong.returncode == 2 and "'window' is int64" in wrong.stderr
    missing = ferry_run("no-such-app")
    assert missing.returncode == 2 and "make -C unikernel" in missing.stderr
    # a "build" that dies at once: the failure is named, exit 1
    (tmp_path / "unix").mkdir()
    fake = tmp_path / "unix" / "broken"
    fake.write_text("#!/bin/sh\necho 'boom: cannot start' >&2\nexit 3\n")
    fake.chmod(0o755)
    died = ferry_run(
        "broken", "--build-dir", str(tmp_path), stdin='{"producer":"d","seq":1,"data":{}}\n'
    )
    assert died.returncode == 1, died.stderr
    assert died.stderr.startswith("error: broken failed") and "boom" in died.stderr
    kept = Path(died.stderr.rsplit("kept in ", 1)[1].strip())
    assert (kept / "guest.log").is_file()  # kept for the author to read
    shutil.rmtree(kept)
