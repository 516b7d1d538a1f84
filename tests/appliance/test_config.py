"""The settings tree: errors name their key, env overrides, secrets from files, validate CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from appliance.cli.main import app
from appliance.config import ConfigError, load_settings
from tests.helpers.paths import REPO

EXAMPLE = REPO / "configs" / "appliance.example.yaml"


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_example_config_is_valid() -> None:
    settings = load_settings(EXAMPLE)
    assert settings.node_id == "edge-01" and settings.mqtt.port == 1883


def test_unknown_key_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"mqtt\.prot: unknown key"):
        load_settings(write(tmp_path, {"mqtt": {"prot": 1884}}))
    with pytest.raises(ConfigError, match=r"colour: unknown key"):
        load_settings(write(tmp_path, {"colour": "red"}))


def test_bad_values_are_named_with_their_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, {"mqtt": {"port": 70000},
                                       "input": {"settle_seconds": -1},
                                       "node_id": "bad id"}))
    text = str(err.value)
    assert "mqtt.port:" in text and "70000" in text
    assert "input.settle_seconds:" in text and "node_id:" in text


def test_env_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, {"mqtt": {"port": 1884, "host": "broker.lan"}})
    monkeypatch.setenv("TERRATILE_MQTT__PORT", "8883")
    settings = load_settings(path)
    assert settings.mqtt.port == 8883 and settings.mqtt.host == "broker.lan"
    monkeypatch.setenv("TERRATILE_MQTT__PORT", "not-a-port")
    with pytest.raises(ConfigError, match=r"mqtt\.port"):
        load_settings(path)


def test_relative_paths_follow_the_file(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {"paths": {"inbox": "in"}}))
    assert settings.paths.inbox == tmp_path.resolve() / "in"
    assert settings.paths.work_dir == tmp_path.resolve() / "work"


def test_password_file_and_systemd_credential(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pw").write_text("hunter2\n")
    settings = load_settings(write(tmp_path, {"mqtt": {"username": "u", "password_file": "pw"}}))
    secret = settings.mqtt.password()
    assert secret is not None and secret.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(settings) and "hunter2" not in str(secret)
    missing = load_settings(write(tmp_path, {"mqtt": {"password_file": "nope"}}))
    with pytest.raises(FileNotFoundError, match="password_file"):
        missing.mqtt.password()
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt_password").write_text("from-systemd")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    plain = load_settings(write(tmp_path, {"mqtt": {"username": "u"}}))
    assert plain.mqtt.password().get_secret_value() == "from-systemd"  # type: ignore[union-attr]


def test_validate_command_output(tmp_path: Path) -> None:
    runner = CliRunner()
    # the example is a valid configuration, but its seed bundle is not on this machine
    example = runner.invoke(app, ["config", "validate", str(EXAMPLE)])
    assert example.exit_code == 1 and "model.bundle:" in example.output
    bad = write(tmp_path, {"mqtt": {"prot": 1}, "tiling": {"scales": []}})
    res = runner.invoke(app, ["config", "validate", str(bad)])
    assert res.exit_code == 1
    assert "invalid configuration" in res.output
    assert "mqtt.prot: unknown key" in res.output and "tiling" in res.output
    missing = runner.invoke(app, ["config", "validate", str(tmp_path / "none.yaml")])
    assert missing.exit_code == 1 and "not found" in missing.output


def test_paths_outbox_is_read_as_results_with_a_warning(tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    settings = load_settings(write(tmp_path, {"paths": {"outbox": "out"}}))
    assert settings.paths.results == tmp_path / "out"  # relative to the file, like the rest
    assert "paths.outbox is deprecated" in caplog.text
    with pytest.raises(ConfigError, match=r"give only paths\.results"):
        load_settings(write(tmp_path, {"paths": {"outbox": "a", "results": "b"}}))


def test_scales_default_to_the_bundles_and_weights_must_match(tmp_path: Path) -> None:
    tiling = load_settings(write(tmp_path, {})).tiling
    assert tiling.scales is None
    assert tiling.for_bundle([32, 64]).scales == [32, 64]
    assert tiling.for_bundle([32, 64]).cell_size == 32
    own = load_settings(write(tmp_path, {"tiling": {"scales": [16], "cell": 8}})).tiling
    assert own.for_bundle([32, 64]).scales == [16] and own.for_bundle([32]).cell_size == 8
    weighted = load_settings(write(tmp_path, {"tiling": {"fusion": "weighted",
                                                         "weights": [1, 2]}})).tiling
    with pytest.raises(ValueError, match="2 weights for the 3 scales"):
        weighted.for_bundle([56, 112, 224])
    with pytest.raises(ConfigError, match="one weight per scale"):
        load_settings(write(tmp_path, {"tiling": {"fusion": "weighted"}}))


def test_errors_suggest_the_nearest_key_and_say_where_a_value_came_from(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, {"model": {"provders": ["cpu"]}, "mqtt": {"port": 70000}})
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    text = str(err.value)
    assert "model.provders: unknown key (did you mean `providers`?)" in text
    assert ("mqtt.port: Input should be less than or equal to 65535 (got 70000) "
            f"[from {path}]") in text
    monkeypatch.setenv("TERRATILE_INPUT__SETTLE_SECONDS", "-3")
    with pytest.raises(ConfigError, match=r"\[from environment variable "
                       r"TERRATILE_INPUT__SETTLE_SECONDS\]"):
        load_settings(write(tmp_path, {}))


def test_rescale_shorthand_and_band_names(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {"input": {"rescale": "percentile",
                                                        "bands": ["red", 3, "B02"]}}))
    assert settings.input.rescale.mode == "percentile"
    assert settings.input.bands == ["red", 3, "B02"]
    with pytest.raises(ConfigError, match=r"input\.rescale\.mode"):
        load_settings(write(tmp_path, {"input": {"rescale": "stretchy"}}))
