"""``terratile process`` and ``terratile status`` (in-process), ``run`` with a bad config."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from appliance.cli.main import app
from appliance.comms.message import Message
from appliance.contract.bundle import sha256_file
from appliance.contract.payloads import SceneResult, result_msg_id
from appliance.ingest.journal import Journal
from tests.helpers.scenes import write_scene


def config(tmp_path: Path, bundle: Path, **extra: object) -> Path:
    path = tmp_path / "appliance.yaml"
    path.write_text(yaml.safe_dump({
        "node_id": "cli-t",
        "paths": {"inbox": "inbox", "results": "results", "failed": "failed", "state": "state"},
        "model": {"bundle": str(bundle), "providers": ["cpu"]},
        "tiling": {"scales": [16, 32]},
        **extra,
    }))
    return path


def test_process_prints_the_result_json(tmp_path: Path, colour_bundle: Path) -> None:
    scene = write_scene(tmp_path / "scene.tif", size=(96, 96))
    res = CliRunner().invoke(app, ["process", str(scene), "--config",
                                   str(config(tmp_path, colour_bundle))])
    assert res.exit_code == 0, res.output
    result = SceneResult.model_validate_json(res.stdout[res.stdout.index("{"):])
    sid = sha256_file(scene)
    assert result.scene_id == sid and result.msg_id == result_msg_id(sid)
    assert result.source == "scene.tif" and result.node_id == "cli-t"
    assert Path(result.outputs["landuse"]).is_file()
    assert scene.is_file()  # `process` never moves its input


def test_process_bad_scene_exits_1_with_reason(tmp_path: Path, colour_bundle: Path) -> None:
    junk = tmp_path / "junk.tif"
    junk.write_text("no raster here")
    res = CliRunner().invoke(app, ["process", str(junk), "--config",
                                   str(config(tmp_path, colour_bundle))])
    assert res.exit_code == 1 and "unreadable" in res.output


def test_status_reads_the_journal(tmp_path: Path, colour_bundle: Path) -> None:
    cfg = config(tmp_path, colour_bundle)
    runner = CliRunner()
    missing = runner.invoke(app, ["status", "--config", str(cfg)])
    assert missing.exit_code == 1 and "no journal" in missing.output
    journal = Journal(tmp_path / "state" / "journal.sqlite")
    journal.claim("a", "a.tif", tmp_path / "work" / "x" / "a.tif")
    journal.claim("b", "b.tif", tmp_path / "work" / "y" / "b.tif")
    journal.start("b")
    journal.finish("b", Message("m", "t", "{}"))
    journal.close()
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "queued.tif").write_bytes(b"x")
    (tmp_path / "inbox" / "busy.tif.part").write_bytes(b"x")
    res = runner.invoke(app, ["status", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["scenes"] == {"claimed": 1, "processing": 0, "done": 1, "failed": 0}
    assert out["inbox"] == 1 and out["outbox_depth"] == 1 and out["model"] is None


def test_run_with_bad_config_exits_78(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("mqtt: {prot: 1}\n")
    res = CliRunner().invoke(app, ["run", "--config", str(bad)])
    assert res.exit_code == 78 and "mqtt.prot: unknown key" in res.output
