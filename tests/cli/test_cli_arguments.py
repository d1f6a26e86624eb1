"""Every ``ferry`` subcommand refuses bad arguments with one clear line and a non-zero exit code,
before it contacts anything (the config points at a port nobody listens on); declared parameters
are typed and checked; a dead guest's console tail is bounded."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from services.common import images, params
from services.executor import guest_log
from tests.conftest import REPO
from tools.cli.main import build_parser, main

BAD = "bad/name"

# Per subcommand: argument lists that must be refused, each with a word the error must name.
REFUSED: dict[str, list[tuple[list[str], str]]] = {
    "up": [(["--bogus"], "unrecognized")],
    "down": [(["extra"], "unrecognized")],
    "status": [(["extra"], "unrecognized")],
    "env": [(["extra"], "unrecognized")],
    "deploy": [
        ([BAD, "--app", "counter", "--node", "edge-a"], "service"),
        (["svc", "--app", BAD, "--node", "edge-a"], "--app"),
        (["svc", "--app", "counter", "--node", BAD], "--node"),
        (["svc", "--app", "counter", "--node", "edge-a", "--runtime", "docker"], "--runtime"),
        (["svc", "--app", "counter", "--node", "edge-a", "--device", "a b"], "--device"),
        (["svc", "--node", "edge-a"], "--app"),
    ],
    "migrate": [([BAD, "--to", "edge-b"], "service"), (["svc", "--to", BAD], "--to")],
    "upgrade": [
        ([BAD], "service"),
        (["svc", "--version", "2.0/0"], "--version"),
        (["svc", "--version", ""], "--version"),
        (["svc", "--to", BAD], "--to"),
    ],
    "suspend": [([BAD], "service"), ([], "service")],
    "resume": [([BAD, "--on", "edge-a"], "service"), (["svc", "--on", ""], "--on")],
    "stop": [([BAD], "service")],
    "rm": [([BAD], "service"), ([], "service")],
    "bind": [([BAD, "dev-1"], "service"), (["svc", BAD], "device")],
    "services": [(["extra"], "unrecognized")],
    "nodes": [(["extra"], "unrecognized")],
    "cordon": [([BAD], "node"), ([], "node"), (["edge-a", "--reason", "x" * 201], "--reason")],
    "uncordon": [([BAD], "node"), (["edge-a", "--reason", "r"], "unrecognized")],
    "drain": [([BAD], "node"), (["edge-a", "--reason", "two\nlines"], "--reason")],
    "migrations": [
        (["--limit", "0"], "--limit"),
        (["--limit", "-3"], "--limit"),
        (["--limit", "x"], "--limit"),
        (["--limit", "10001"], "--limit"),
    ],
    "watch": [(["a/#/b"], "filter"), (["apps/x+/out"], "filter"), ([""], "filter")],
    "checkpoint show": [
        ([BAD], "service"),
        ([BAD, "--fresh"], "service"),
        (["svc", "--fresh", "now"], "unrecognized"),
    ],
    "image push": [([BAD], "apps"), ([], "apps"), (["counter", "--build", BAD], "--build")],
    "image show": [(["../etc"], "app")],
    "simulate": [
        ([BAD], "service"),
        (["svc", "--rate", "-5"], "--rate"),
        (["svc", "--rate", "0"], "--rate"),
        (["svc", "--rate", "nan"], "--rate"),
        (["svc", "--duration", "-1"], "--duration"),
        (["svc", "--duration", "0"], "--duration"),
        (["svc", "--devices", "0"], "--devices"),
        (["svc", "--move-every", "-2"], "--move-every"),
        (["svc", "--move-between", f"edge-a,{BAD}"], "--move-between"),
    ],
    "run": [
        ([BAD], "app"),
        ([], "app"),
        (["counter", "--runtime", "docker"], "--runtime"),
        (["counter", "--checkpoint-at", "0"], "--checkpoint-at"),
        (["counter", "--checkpoint-at", "x"], "--checkpoint-at"),
    ],
    "publish": [([BAD, "{}"], "service"), (["svc"], "JSON")],
}


def leaf_commands(parser: argparse.ArgumentParser, prefix: str = "") -> list[str]:
    """Every runnable subcommand, nested ones as 'checkpoint show'."""
    found: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += leaf_commands(sub, f"{prefix}{name} ") or [f"{prefix}{name}"]
    return found


@pytest.fixture
def dead_config(tmp_path: Path) -> Path:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "ferry.toml"
    config.write_text(
        f'[stack]\ndir = "{tmp_path / "stack"}"\n[broker]\nport = {port}\n'
        f'[s3]\nendpoint = "http://127.0.0.1:{port}"\n'
    )
    return config


def test_the_table_covers_every_subcommand() -> None:
    assert sorted(leaf_commands(build_parser())) == sorted(REFUSED)


@pytest.mark.parametrize(
    ("command", "argv", "named"),
    [(command, argv, named) for command, cases in REFUSED.items() for argv, named in cases],
)
def test_a_bad_argument_is_one_clear_line_and_exit_2(
    command: str, argv: list[str], named: str, dead_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--config", str(dead_config), *command.split(), *argv])
    assert exited.value.code == 2
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert len(lines) == 1, out.err
    # unrecognized arguments are the top-level parser's to report
    prog = "ferry" if named == "unrecognized" else f"ferry {command}"
    assert lines[0].startswith(f"{prog}: error:") and named in lines[0], lines[0]
    assert "cannot connect" not in out.err  # refused before anything was contacted


@pytest.mark.parametrize(
    "argv",
    [
        ["deploy", "svc", "--app", "counter", "--node", "edge-a", "--runtime", "docker"],
        ["deploy", BAD, "--app", "counter", "--node", "edge-a"],
        ["simulate", "svc", "--rate", "-5"],
        ["deploy", "svc", "--app", "counter", "--node", "edge-a", "--param", "=3"],
        ["simulate", "svc", "--duration", "0.2"],  # well-formed: the stack is down
    ],
)
def test_no_traceback_from_the_real_program(argv: list[str], dead_config: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tools.cli", "--config", str(dead_config), *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and done.stderr.startswith(("ferry", "error:"))
    assert done.stderr.count("\n") <= 2, done.stderr


def test_env_names_the_broker_and_a_ready_mosquitto_pub_line(dead_config: Path) -> None:
    port = dead_config.read_text().split("port = ")[1].split()[0]
    done = subprocess.run(
        [sys.executable, "-m", "tools.cli", "--config", str(dead_config), "env"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert f"FERRY_BROKER=mqtt://127.0.0.1:{port}" in done.stdout
    assert f"FERRY_CONFIG={dead_config}" in done.stdout
    assert f"mosquitto_pub -h 127.0.0.1 -p {port}" in done.stdout


# -- declared parameters --------------------------------------------------------------------

AGGREGATOR = [
    {"name": "window", "type": "int64", "default": 64, "doc": "samples"},
    {"name": "threshold", "type": "float64", "default": 100, "doc": "alert"},
    {"name": "label", "type": "string", "default": "x", "doc": "a name"},
    {"name": "loud", "type": "bool", "default": False, "doc": "shout"},
]


def test_param_values_are_typed_by_the_declaration() -> None:
    raw = params.split(["window=30", "threshold=30", "label=30", "loud=yes"])
    typed = params.parse("aggregator", AGGREGATOR, raw)
    assert typed == {"window": 30, "threshold": 30.0, "label": "30", "loud": True}
    assert isinstance(typed["threshold"], float) and isinstance(typed["label"], str)
    # an app that declares nothing gets the old JSON guesses
    assert params.parse("old", None, {"n": "30", "s": "abc"}) == {"n": 30, "s": "abc"}


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        (["windw=3"], "has no parameter 'windw' (it takes: window, threshold, label, loud"),
        (["window=3.5"], "'window' is int64, got '3.5'"),
        (["window=abc"], "'window' is int64"),
        (["window=99999999999999999999"], "int64 range"),
        (["threshold=inf"], "finite"),
        (["loud=maybe"], "'loud' is bool"),
        (["novalue"], "KEY=VALUE"),
    ],
)
def test_a_bad_param_is_refused_with_what_the_app_takes(pairs: list[str], message: str) -> None:
    with pytest.raises(params.ParamError, match=None) as refused:
        params.parse("aggregator", AGGREGATOR, params.split(pairs))
    assert message in str(refused.value)


def test_the_scheduler_check_refuses_wrong_json_types() -> None:
    params.check("aggregator", AGGREGATOR, {"window": 8, "threshold": 8, "label": "a"})
    for bad in ({"window": "8"}, {"window": True}, {"window": 1.5}, {"loud": 1}, {"x": 1}):
        with pytest.raises(params.ParamError):
            params.check("aggregator", AGGREGATOR, bad)
    with pytest.raises(params.ParamError, match="declares no parameters"):
        params.check("counter", [], {"x": 1})
    params.check("old", None, {"anything": 1})


def test_the_real_builds_declare_their_params_in_hello(unikernel_builds: Path) -> None:
    hello = images.read_hello(images.build_file(unikernel_builds, "unix", "aggregator"))
    declared = {p["name"]: p for p in hello["params"]}
    assert set(declared) == {"window", "threshold", "ballast_kb", "history_sensors"}
    assert declared["window"]["type"] == "int64" and declared["window"]["default"] == 64
    assert declared["threshold"]["type"] == "float64" and declared["threshold"]["default"] == 100
    assert all(p["doc"] for p in hello["params"])
    counter = images.read_hello(images.build_file(unikernel_builds, "unix", "counter"))
    assert counter["params"] == []
    for app in ("procedural", "threshold"):
        hello = images.read_hello(images.build_file(unikernel_builds, "unix", app))
        assert hello["params"] and images.app_info(hello)["params"] == hello["params"]


# -- a dead guest's console tail ------------------------------------------------------------


def test_tail_is_bounded_by_lines_and_bytes(tmp_path: Path) -> None:
    log = tmp_path / "console.log"
    assert guest_log.tail(log) == ""  # no file
    log.write_bytes(b"".join(b"line %d\n" % i for i in range(100)) + b"#UD rip=0x1001af\n\n")
    assert guest_log.tail(log).splitlines() == [
        "line 96",
        "line 97",
        "line 98",
        "line 99",
        "#UD rip=0x1001af",
    ]
    log.write_bytes(b"x" * 100_000 + b"\xff\xfe garbage\n" + b"y" * 5000)
    text = guest_log.tail(log, max_lines=5, max_bytes=1024)
    assert len(text.encode()) <= 1024 and set(text) <= {"y"}
    reason = guest_log.explain("guest exited: {'code': 134}", log)
    assert reason.startswith("guest exited") and "last lines of console.log" in reason
    assert len(reason) <= guest_log.MAX_REASON


def test_repo_builds_are_where_the_guide_says(unikernel_builds: Path) -> None:
    assert (REPO / "docs" / "writing-an-app.md").is_file()
    for app in (REPO / "unikernel" / "apps").glob("*.c"):
        assert images.build_file(unikernel_builds, "unix", app.stem).is_file()
