"""The CLI as a Unix tool: stdout carries only data (the real CLI, default providers, on a
box without a GPU), several scenes at once, overrides, default config path, version."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from rasterio.enums import ColorInterp as CI
from typer.testing import CliRunner

from appliance.cli.index import resolve_scene
from appliance.cli.main import app
from appliance.comms.message import Message
from appliance.config import load_settings
from appliance.ingest.journal import Journal
from tests.conftest import Broker
from tests.helpers.paths import REPO
from tests.helpers.scenes import quarters, write_scene


def config(tmp_path: Path, bundle: Path, **extra: object) -> Path:
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump({
        "node_id": "unix-t",
        "paths": {"inbox": "inbox", "results": "results", "failed": "failed", "state": "state"},
        "model": {"bundle": str(bundle)},  # default providers: tensorrt, cuda, cpu
        "tiling": {"scales": [16, 32]},
        **extra,
    }))
    return path


def terratile(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real command line, in a fresh interpreter (onnxruntime's own output included)."""
    return subprocess.run(
        [sys.executable, "-c", "from appliance.cli.main import app; app()", *args],
        capture_output=True, text=True, timeout=240, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})


def test_stdout_is_pure_json_with_the_default_providers(tmp_path: Path,
                                                        colour_bundle: Path) -> None:
    scene = write_scene(tmp_path / "scene.tif", size=(64, 64))
    cfg = config(tmp_path, colour_bundle)
    assert load_settings(cfg).model.providers == ["tensorrt", "cuda", "cpu"]
    res = terratile("process", str(scene), "--config", str(cfg))
    assert res.returncode == 0, res.stderr
    result = json.loads(res.stdout)  # the whole of stdout, nothing before or after
    assert result["schema"] == "terratile.scene-result/2" and result["source"] == "scene.tif"
    stats = terratile("index", "stats", "--config", str(cfg), "--json")
    if stats.returncode == 0:
        json.loads(stats.stdout)
    query = terratile("query", "--config", str(cfg), "--image", str(scene), "--json")
    assert json.loads(query.stdout)["schema"] == "terratile.retrieval-response/1", query.stderr


def test_several_scenes_into_an_output_folder(tmp_path: Path, colour_bundle: Path) -> None:
    a = write_scene(tmp_path / "a.tif", size=(64, 64))
    b = write_scene(tmp_path / "b.tif", size=(64, 64), layout=quarters(64, 64))
    res = CliRunner().invoke(app, ["process", str(a), str(b), "-o", str(tmp_path / "o"),
                                   "--config", str(config(tmp_path, colour_bundle))])
    assert res.exit_code == 0, res.output
    results = json.loads(res.stdout)
    assert [r["source"] for r in results] == ["a.tif", "b.tif"]
    assert all(Path(r["outputs"]["landuse"]).parent.parent == tmp_path / "o" for r in results)
    assert (tmp_path / "o" / "catalog.json").is_file()


def test_bands_and_bundle_overrides(tmp_path: Path, colour_bundle: Path) -> None:
    plain = write_scene(tmp_path / "bgrn.tif", bands=4, dtype="uint16", gain=40,
                        band_order=(2, 1, 0), size=(64, 64))
    cfg = config(tmp_path, tmp_path / "no-such-bundle", model={"providers": ["cpu"]})
    cfg.write_text(cfg.read_text().replace(str(tmp_path / "no-such-bundle"), "null"))
    runner = CliRunner()
    failed = runner.invoke(app, ["process", str(plain), "--config", str(cfg),
                                 "--bundle", str(colour_bundle)])
    assert failed.exit_code == 1 and "bands:" in failed.stderr and failed.stdout == ""
    ok = runner.invoke(app, ["process", str(plain), "--config", str(cfg),
                             "--bundle", str(colour_bundle), "--bands", "3,2,1"])
    assert ok.exit_code == 0, ok.output
    assert [b["index"] for b in json.loads(ok.stdout)["input"]["bands"]] == [3, 2, 1]
    named = write_scene(tmp_path / "named.tif", bands=4, dtype="uint16", gain=40,
                        band_order=(2, 1, 0), size=(64, 64),
                        colorinterp=[CI.blue, CI.green, CI.red, CI.undefined])
    by_name = runner.invoke(app, ["process", str(named), "--config", str(cfg),
                                  "--bundle", str(colour_bundle), "--bands", "red,green,blue"])
    assert by_name.exit_code == 0, by_name.output


def test_version_help_and_default_config(tmp_path: Path, colour_bundle: Path) -> None:
    runner = CliRunner()
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout.startswith("terratile ")
    assert "process" in runner.invoke(app, ["-h"]).stdout
    cfg = config(tmp_path, colour_bundle)
    scene = write_scene(tmp_path / "scene.tif", size=(64, 64))
    res = runner.invoke(app, ["process", str(scene)], env={"TERRATILE_CONFIG": str(cfg)})
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["node_id"] == "unix-t"


def test_query_scene_accepts_a_prefix_or_the_file_name(tmp_path: Path,
                                                       colour_bundle: Path) -> None:
    settings = load_settings(config(tmp_path, colour_bundle))
    journal = Journal(settings.paths.state / "journal.sqlite")
    for sid, name in (("ab" * 32, "north.tif"), ("ac" * 32, "south.tif")):
        journal.claim(sid, name, tmp_path / "work" / name)
        journal.start(sid)
        journal.finish(sid, Message(sid, "t", "{}"))
    journal.close()
    assert resolve_scene(settings, "abab") == "ab" * 32
    assert resolve_scene(settings, "south.tif") == "ac" * 32
    assert resolve_scene(settings, "ff") == "ff"  # unknown: the query says unknown-scene
    with pytest.raises(ValueError, match="matches 2 scenes"):
        resolve_scene(settings, "a")


def test_config_validate_checks_paths_bundle_and_broker(
        tmp_path: Path, colour_bundle: Path, broker: Broker) -> None:
    cfg = config(tmp_path, colour_bundle, mqtt={"port": broker.port})
    runner = CliRunner()
    ok = runner.invoke(app, ["config", "validate", str(cfg), "--connect"])
    assert ok.exit_code == 0 and "OK" in ok.stdout, ok.output
    broker.stop()
    down = runner.invoke(app, ["config", "validate", str(cfg), "--connect"])
    assert down.exit_code == 1 and "mqtt.host:" in down.stderr
    bad = config(tmp_path, tmp_path / "missing", paths={"inbox": "/proc/1/nope/inbox",
                                                        "state": "state"})
    res = runner.invoke(app, ["config", "validate", str(bad)])
    assert res.exit_code == 1
    assert "paths.inbox:" in res.stderr and "model.bundle:" in res.stderr
