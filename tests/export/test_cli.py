"""``terratile-export`` end to end through its CLI: train → bundle → evaluate, and bad data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from appliance.contract.bundle import load_bundle
from export.cli import app
from tests.helpers.chips import write_geotiff_chips
from tests.helpers.torch_bundle import write_colour_chips

runner = CliRunner()
TINY = ["--backbone", "resnet18", "--epochs", "1", "--image-size", "32", "--no-pretrained",
        "--batch-size", "8"]

pytestmark = pytest.mark.slow  # trains and exports real (tiny) networks


def test_evaluate_held_out_split_as_json(tiny_run: Path) -> None:
    result = runner.invoke(app, ["evaluate", "--bundle", str(tiny_run / "bundle"), "--run",
                                 str(tiny_run / "run"), "--split", "val", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    split = json.loads((tiny_run / "run" / "split.json").read_text())
    assert report["chips"] == len(split["val"]) == 6
    for key in ("overall_accuracy", "kappa", "macro_f1", "map_at_20", "precision_at_5", "anmrr"):
        assert isinstance(report[key], float), key
    cm = np.asarray(report["confusion_matrix"])
    assert cm.sum() == 6 and np.trace(cm) / 6 == report["overall_accuracy"]


def test_four_band_geotiffs_train_bundle_evaluate(tmp_path: Path) -> None:
    data = write_geotiff_chips(tmp_path / "g")
    run, out = tmp_path / "run", tmp_path / "bundle"
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(run), *TINY])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["bundle", "--run", str(run), "--out", str(out), "--version", "3",
                            "--name", "geo", "--scales", "16,32"])
    assert r.exit_code == 0, r.output
    manifest = load_bundle(out).manifest
    assert manifest.input.bands == ["band0", "band1", "band2", "band3"]
    assert manifest.name == "geo" and manifest.version == 3 and manifest.scales == [16, 32]
    assert manifest.metrics["parity"]["fp32"]["max_abs_diff"] < 1e-4
    # 1 m pixels on UTM 33N's central meridian: the training GSD measured from the chips
    assert manifest.gsd == pytest.approx(1 / 0.9996, rel=1e-4)
    assert manifest.palette == "semantic"
    r = runner.invoke(app, ["evaluate", "--bundle", str(out), "--data", str(data), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["chips"] == 18
    palette = tmp_path / "palette.yaml"
    palette.write_text("bright: '#f0d020'\ndark: [20, 40, 60]\n")
    r = runner.invoke(app, ["bundle", "--run", str(run), "--out", str(tmp_path / "b2"),
                            "--gsd", "0.5", "--palette", str(palette)])
    assert r.exit_code == 0, r.output
    own = load_bundle(tmp_path / "b2").manifest
    assert own.gsd == 0.5 and own.palette == "custom"
    assert {c.name: c.colour for c in own.map_classes}["bright"] == (240, 208, 32)
    assert {c.name: c.colour for c in own.classes}["dark"] == (20, 40, 60)
    palette.write_text("lava: '#ff0000'\n")
    r = runner.invoke(app, ["bundle", "--run", str(run), "--out", str(tmp_path / "b3"),
                            "--palette", str(palette)])
    assert r.exit_code == 2 and "lava" in r.output


def test_multi_label_csv_train_bundle_evaluate(tmp_path: Path) -> None:
    data = write_colour_chips(tmp_path / "d", per_class=6, size=32)
    rows = [f"{p},{p.parent.name}|{'wet' if p.parent.name == 'water' else 'dry'}"
            for p in sorted(data.rglob("*.png"))]
    (data / "labels.csv").write_text("path,labels\n" + "\n".join(rows) + "\n")
    run, out = tmp_path / "run", tmp_path / "bundle"
    r = runner.invoke(app, ["train", "--data", str(data / "labels.csv"), "--task", "multi-label",
                            "--out", str(run), *TINY])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["bundle", "--run", str(run), "--out", str(out)])
    assert r.exit_code == 0, r.output
    b = load_bundle(out)
    assert b.manifest.task == "multi-label" and b.source_bank.labels.shape[1] == 5
    r = runner.invoke(app, ["evaluate", "--bundle", str(out), "--data", str(data), "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert 0 <= report["micro_f1"] <= 1 and 0 <= report["map_at_20"] <= 1
    assert set(report["per_class_f1"]) == {"dry", "urban", "vegetation", "water", "wet"}


def test_bad_data_is_a_clear_error(tmp_path: Path) -> None:
    data = write_colour_chips(tmp_path / "d", per_class=3)
    (data / "empty").mkdir()
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "r"), *TINY])
    assert r.exit_code == 2 and "empty class folder" in r.output
    r = runner.invoke(app, ["train", "--data", str(tmp_path / "missing"),
                            "--out", str(tmp_path / "r"), *TINY])
    assert r.exit_code == 2 and "no such file or directory" in r.output
    (data / "empty").rmdir()
    (data / "water" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "r"), *TINY])
    assert r.exit_code == 2 and "bad.jpg: unreadable image" in r.output


def test_unknown_backbone_and_missing_calibration(tiny_run: Path, tmp_path: Path) -> None:
    r = runner.invoke(app, ["train", "--data", str(tiny_run / "data"), "--out", str(tmp_path),
                            "--backbone", "vgg99"])
    assert r.exit_code == 2 and "unknown backbone 'vgg99'" in r.output
    r = runner.invoke(app, ["bundle", "--run", str(tiny_run / "run"), "--out", str(tmp_path / "b"),
                            "--int8"])
    assert r.exit_code == 2 and "--calibration" in r.output


def test_evaluate_refuses_a_tampered_bundle(tiny_run: Path, tmp_path: Path) -> None:
    import shutil

    copy = shutil.copytree(tiny_run / "bundle", tmp_path / "b")
    (copy / "embedder.onnx").write_bytes(b"junk")
    r = runner.invoke(app, ["evaluate", "--bundle", str(copy), "--data", str(tiny_run / "data")])
    assert r.exit_code == 2 and "sha256 mismatch for embedder.onnx" in r.output


def test_pretrained_timm_without_hub_fails_clearly(tiny_run: Path, tmp_path: Path) -> None:
    from export.backbones import hub_reachable

    if hub_reachable():
        pytest.skip("the Hugging Face hub is reachable here; this checks the offline error")
    r = runner.invoke(app, ["train", "--data", str(tiny_run / "data"), "--out", str(tmp_path),
                            "--backbone", "resnet18", "--pretrained"])
    assert r.exit_code == 2 and "--no-pretrained" in r.output and "unreachable" in r.output


def test_init_starts_from_a_previous_run(tiny_run: Path, tmp_path: Path) -> None:
    """A second round (--init) starts from the first run's weights, not from scratch."""
    import torch

    run = tmp_path / "round2"
    r = runner.invoke(app, ["train", "--data", str(tiny_run / "data"), "--out", str(run),
                            "--init", str(tiny_run / "run"), "--lr", "0", *TINY])
    assert r.exit_code == 0, r.output
    first = torch.load(tiny_run / "run" / "checkpoint.pt", weights_only=True)["model"]
    second = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    convs = [k for k in first if k.endswith("conv1.weight")]
    assert convs and all(torch.equal(first[k], second[k]) for k in convs)
    assert torch.equal(first["classifier.weight"], second["classifier.weight"])
