"""``terratile index add|stats`` and ``terratile query`` through typer, on real files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from appliance.cli.main import app
from tests.helpers.colour_bundle import EMBED_DIM, PURE
from tests.helpers.scenes import write_scene

runner = CliRunner()


@pytest.fixture()
def setup(tmp_path: Path, colour_bundle: Path) -> tuple[Path, Path]:
    """A config using the colour bundle and a folder of reference images (one broken)."""
    refs = tmp_path / "refs"
    for name, colour in PURE.items():
        (refs / name).mkdir(parents=True)
        for i in range(3):
            jitter = tuple(min(255, c + 5 * i) for c in colour)
            Image.new("RGB", (48, 48), jitter).save(refs / name / f"{name}{i}.png")
    Image.new("RGB", (30, 30), PURE["water"]).save(refs / "water" / "lake.jpg")
    write_scene(refs / "vegetation" / "chip.tif", size=(64, 64),
                layout=lambda r, c: np.full((r.shape[0], c.shape[1]), "vegetation"))
    (refs / "urban" / "broken.png").write_bytes(b"\x89PNG not really")
    (refs / "misc").mkdir()
    Image.new("RGB", (40, 40), PURE["urban"]).save(refs / "misc" / "unlabelled-red.png")
    config = tmp_path / "appliance.yaml"
    config.write_text(yaml.safe_dump({
        "paths": {"inbox": "inbox", "results": "results", "failed": "failed", "state": "state"},
        "model": {"bundle": str(colour_bundle), "providers": ["cpu"]},
        "retrieval": {"allowed_dirs": ["refs"]},
    }))
    return config, refs


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_index_add_stats_and_query(setup: tuple[Path, Path]) -> None:
    config, refs = setup
    code, out = invoke("index", "add", "--config", str(config), str(refs))
    assert code == 0, out
    assert "indexed 12 reference images" in out and "broken.png" in out  # 9 + jpg + tif + misc
    code, out = invoke("index", "stats", "--config", str(config), "--json")
    stats = json.loads(out)
    assert stats["entries"] == 12 and stats["reference_images"] == 12
    assert stats["type"] == "flat" and stats["dim"] == EMBED_DIM and stats["bytes_on_disk"] > 0
    # misc/ is not a class: the predicted class is stored, the folder is the label.
    assert stats["classes"] == {"urban": 4, "vegetation": 4, "water": 4}

    code, out = invoke("query", "--config", str(config), "--image",
                       str(refs / "water" / "lake.jpg"), "-k", "20", "--json")
    assert code == 0, out
    reply = json.loads(out)
    assert list(reply) == ["schema", "msg_id", "node_id", "request_id", "query", "results",
                           "took_ms", "ts"]  # the envelope an MQTT reply has
    results = reply["results"]
    assert len(results) == 12
    assert {"score", "source", "scene_id", "bounds", "class"} <= set(results[0])
    assert results[0]["source"] == "water/lake.jpg" and results[0]["score"] > 0.999
    assert [r["class"] for r in results[:4]] == ["water"] * 4

    code, out = invoke("query", "--config", str(config), "--image",
                       str(refs / "urban" / "urban0.png"), "-k", "5", "--class", "vegetation",
                       "--json")
    assert {r["class"] for r in json.loads(out)["results"]} == {"vegetation"}

    # Re-adding the same folder replaces, never duplicates.
    code, out = invoke("index", "add", "--config", str(config), str(refs))
    assert code == 0
    code, out = invoke("index", "stats", "--config", str(config), "--json")
    assert json.loads(out)["entries"] == 12


def test_query_by_vector_file_and_errors(setup: tuple[Path, Path], tmp_path: Path) -> None:
    config, refs = setup
    assert invoke("index", "add", "--config", str(config), str(refs))[0] == 0
    vec = tmp_path / "v.json"
    vec.write_text(json.dumps([1.0] + [0.0] * (EMBED_DIM - 1)))
    code, out = invoke("query", "--config", str(config), "--vector-file", str(vec), "-k", "3",
                       "--json")
    assert code == 0 and len(json.loads(out)["results"]) == 3
    code, out = invoke("query", "--config", str(config), "--scene", "nope", "--pixel", "1", "2",
                       "--json")
    assert code == 1 and json.loads(out)["error"]["code"] == "unknown-scene"
    code, out = invoke("query", "--config", str(config), "--vector-file", str(vec), "-k", "0",
                       "--json")
    assert code == 1 and json.loads(out)["error"]["code"] == "bad-request"
    code, out = invoke("query", "--config", str(config), "--vector-file", str(vec),
                       "--since", "last tuesday", "--json")
    assert code == 1 and "since" in json.loads(out)["error"]["message"]
    code, out = invoke("query", "--config", str(config), "--json")
    assert code == 1 and json.loads(out)["error"]["code"] == "bad-request"
    vec.write_text("1 2 three")
    code, out = invoke("query", "--config", str(config), "--vector-file", str(vec), "--json")
    error = json.loads(out)["error"]
    assert code == 1 and error["code"] == "bad-request" and "v.json" in error["message"]
