"""Configuration: file + environment layering and errors that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common.config import ConfigError, load_config


def test_defaults_file_and_environment_layer_in_order(tmp_path: Path) -> None:
    path = tmp_path / "ferry.toml"
    path.write_text('[broker]\nport = 2000\nhost = "10.0.0.1"\n[stack]\nnodes = ["x", "y", "z"]\n')
    config = load_config(path, env={"FERRY_BROKER__PORT": "3000"})
    assert config.broker.port == 3000
    assert config.broker.host == "10.0.0.1"
    assert config.stack.nodes == ["x", "y", "z"]
    assert config.s3.region == "us-east-1"
    assert config.source == path


def test_round_trips_through_toml(tmp_path: Path) -> None:
    config = load_config(env={"FERRY_S3__SECURE": "true", "FERRY_EXECUTOR__CAPACITY": "7"})
    path = tmp_path / "ferry.toml"
    path.write_text(config.to_toml())
    again = load_config(path, env={})
    assert again.s3.secure is True
    assert again.executor.capacity == 7
    assert again.broker == config.broker


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ('[broker]\nport = "x"\n', {}, r"broker.port \(from .*ferry.toml\): expected int"),
        ("[brokr]\n", {}, r"unknown section \[brokr\]"),
        ("[broker]\nprot = 1\n", {}, "unknown key broker.prot"),
        ("", {"FERRY_BROKER__PORT": "abc"}, "FERRY_BROKER__PORT='abc': expected an integer"),
        ("", {"FERRY_NOPE__X": "1"}, "FERRY_NOPE__X names no config key"),
        ("[broker]\nport = -1\n", {}, "must not be negative"),
        ("[broker\n", {}, "not valid TOML"),
    ],
)
def test_errors_name_the_key_and_its_source(
    tmp_path: Path, text: str, env: dict[str, str], message: str
) -> None:
    path = tmp_path / "ferry.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, env=env)


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="FERRY_CONFIG points to"):
        load_config(env={"FERRY_CONFIG": str(tmp_path / "nope.toml")})


def test_the_shipped_example_configures_every_key() -> None:
    from services.common.config import DEFAULTS

    example = Path(__file__).resolve().parents[1] / "deploy" / "ferry.example.toml"
    config = load_config(example, env={})
    assert config.broker.host == "mqtt.example.internal" and config.s3.secure is True
    import tomllib

    written = tomllib.loads(example.read_text())
    for section, keys in DEFAULTS.items():
        assert set(written[section]) == set(keys), f"[{section}] in the example is incomplete"
