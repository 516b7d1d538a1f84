"""A real torch-exported bundle: contract, parity with torch, sealing, tampering, int8."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from rich.console import Console

from appliance.contract.bundle import (
    BACKBONE,
    CLASSIFIER,
    EMBEDDER,
    LAYER_STATS,
    MANIFEST,
    REFERENCE,
    SOURCE_BANK,
    BundleError,
    holdout_rows,
    load_bundle,
)
from appliance.model.runtime import ModelRuntime, ProviderPlan
from export.bundler import BundleOptions, bundle
from export.data import SPLIT_FILE, load_chips, load_split
from export.model import Descriptor
from export.train import METRICS, RUN_FILE, load_trained, predict

CPU = ProviderPlan(providers=("cpu",))

pytestmark = pytest.mark.slow  # trains and exports real (tiny) networks


def test_bundle_matches_the_contract(tiny_run: Path) -> None:
    b = load_bundle(tiny_run / "bundle")
    m = b.manifest
    assert m.class_names == ["urban", "vegetation", "water"]
    assert len({c.colour for c in m.classes}) == 3
    assert m.input.bands == ["red", "green", "blue"] and m.input.size == 32
    assert m.scales == [16, 32] and m.backbone == "resnet18"
    assert set(m.files) == {BACKBONE, CLASSIFIER, EMBEDDER, SOURCE_BANK, REFERENCE, LAYER_STATS}
    io = {name: onnx.load(str(b.file(name))).graph for name in (BACKBONE, CLASSIFIER, EMBEDDER)}
    assert [i.name for i in io[BACKBONE].input] == ["image"]
    assert [o.name for o in io[BACKBONE].output] == ["features"]
    assert [o.name for o in io[CLASSIFIER].output] == ["logits"]
    assert [o.name for o in io[EMBEDDER].output] == ["embedding"]
    assert io[BACKBONE].input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic N
    bank = b.source_bank
    assert bank.features.shape[1] == m.feature_dim == 512
    assert (bank.holdout == holdout_rows(bank.labels)).all() and bank.holdout.any()
    assert sorted(np.unique(bank.labels).tolist()) == [0, 1, 2]
    assert len(b.reference.bands) == 3 and 0 <= b.reference.bands[0].mean <= 255


def test_json_files_are_renamed_into_place_before_sealing(tiny_run: Path) -> None:
    """The exporter's JSON files are whole under their own names, no temporary of
    atomic_write_text is left beside them, and the bundle holds only sealed files."""
    sealed = load_bundle(tiny_run / "bundle").manifest.files
    assert sorted(p.name for p in (tiny_run / "bundle").iterdir()) == sorted({*sealed, MANIFEST})
    run = tiny_run / "run"
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    for name in (RUN_FILE, METRICS, SPLIT_FILE):
        assert json.loads((run / name).read_text())


def test_appliance_runtime_matches_torch(tiny_run: Path) -> None:
    """Parity of the exported graphs through ModelRuntime on real chips, any batch size."""
    b = load_bundle(tiny_run / "bundle")
    info, model = load_trained(tiny_run / "run")
    chips = load_chips(load_split(tiny_run / "run", "val"), info.input_spec.size).images
    feats, logits, _ = predict(model, chips, info.input_spec)
    with torch.no_grad():  # the exported descriptor: embedding ⊕ posterior, normalised
        emb = Descriptor(model.embedder, model.classifier, False)(torch.from_numpy(feats)).numpy()
    assert emb.shape[1] == b.manifest.embedding_dim
    runtime = ModelRuntime(b, CPU)
    for n in (1, len(chips)):
        out = runtime.infer(chips[:n])
        assert np.abs(out.features - feats[:n]).max() < 1e-4
        probs = torch.softmax(torch.from_numpy(logits[:n]), 1).numpy()
        assert np.abs(out.probs - probs).max() < 1e-4
        assert np.abs(out.embedding - emb[:n]).max() < 1e-4
    assert np.allclose(np.linalg.norm(out.embedding, axis=1), 1.0, atol=1e-5)
    parity = b.manifest.metrics["parity"]["fp32"]
    assert parity["max_abs_diff"] < 1e-4


def test_tampered_file_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_run / "bundle", tmp_path / "b")
    with (copy / CLASSIFIER).open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(BundleError, match=r"sha256 mismatch for classifier\.onnx"):
        load_bundle(copy)


def test_missing_file_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_run / "bundle", tmp_path / "b")
    (copy / SOURCE_BANK).unlink()
    with pytest.raises(BundleError, match=r"missing file source_bank\.npz"):
        load_bundle(copy)


def test_manifest_edit_is_refused(tiny_run: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(tiny_run / "bundle", tmp_path / "b")
    doc = json.loads((copy / MANIFEST).read_text())
    doc["files"][BACKBONE] = "0" * 64
    (copy / MANIFEST).write_text(json.dumps(doc))
    with pytest.raises(BundleError, match=r"backbone\.onnx"):
        load_bundle(copy)


def test_int8_bundle_is_quantised_and_close(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "int8"
    manifest = bundle(tiny_run / "run", out, BundleOptions(
        precision="int8", calibration=tiny_run / "data", version=2, scales=(16, 32)),
        Console(quiet=True))
    ops = {n.op_type for n in onnx.load(str(out / BACKBONE)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    parity = manifest.metrics["parity"]
    assert parity["fp32"]["max_abs_diff"] < 1e-4 and parity["int8"]["max_abs_diff"] > 0
    b = load_bundle(out)
    assert b.version == 2 and b.manifest.metrics["precision"] == "int8"
    probs = ModelRuntime(b, CPU).infer(np.full((2, 3, 32, 32), 128, np.float32)).probs
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)


def test_pooled_descriptor_is_the_normalised_backbone_feature(tiny_run: Path,
                                                               tmp_path: Path) -> None:
    manifest = bundle(tiny_run / "run", tmp_path / "pooled",
                      BundleOptions(descriptor="pooled", scales=(16, 32)), Console(quiet=True))
    assert manifest.embedding_dim == manifest.feature_dim
    out = ModelRuntime(load_bundle(tmp_path / "pooled"), CPU).infer(
        np.random.default_rng(0).uniform(0, 255, (3, 3, 32, 32)).astype(np.float32))
    expected = out.features / np.linalg.norm(out.features, axis=1, keepdims=True)
    np.testing.assert_allclose(out.embedding, expected, atol=1e-5)


def test_bundle_at_a_larger_input_size_runs_at_that_size(tiny_run: Path, tmp_path: Path) -> None:
    """``input_size`` re-exports the graphs for a larger input (FixRes): the box resizes its
    tiles to it, the appliance's output equals torch's at that size, and the manifest keeps
    the size the run was trained at."""
    manifest = bundle(tiny_run / "run", tmp_path / "fix", BundleOptions(
        scales=(16, 32), input_size=40), Console(quiet=True))
    assert manifest.input.size == 40 and manifest.metrics["train_input_size"] == 32
    info, model = load_trained(tiny_run / "run")
    chips = np.random.default_rng(1).uniform(0, 255, (4, 3, 40, 40)).astype(np.float32)
    out = ModelRuntime(load_bundle(tmp_path / "fix"), CPU).infer(chips)
    _, logits, _ = predict(model, chips, manifest.input)
    np.testing.assert_allclose(out.probs, torch.softmax(torch.from_numpy(logits), 1).numpy(),
                               atol=1e-5)
    assert info.input_spec.size == 32
