"""A TTA bundle (real torch-exported ONNX): probabilities are the mean over the flipped and
turned tiles, features stay the plain view's, and ``model.tta: off`` restores the plain path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from appliance.config import Settings
from appliance.contract.bundle import MANIFEST, load_bundle
from appliance.model.runtime import ModelRuntime, ProviderPlan, open_runtime
from export.bundler import BundleOptions, bundle
from export.evaluate import evaluate

CPU = ProviderPlan(providers=("cpu",))

pytestmark = pytest.mark.slow  # exports a real (tiny) network


@pytest.fixture(scope="module")
def tta_bundle(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tta") / "bundle"
    bundle(tiny_run / "run", out, BundleOptions(name="tiny-tta", scales=(16, 32),
                                                 tta="flips-rot90"), Console(quiet=True))
    return out


def _noise(size: int) -> np.ndarray:
    """Tiles with no symmetry, so every view really differs."""
    return np.random.default_rng(3).uniform(0, 255, (4, 3, size, size)).astype(np.float32)


def test_manifest_records_tta_and_plain_bundles_stay_plain(tiny_run: Path,
                                                           tta_bundle: Path) -> None:
    assert load_bundle(tta_bundle).manifest.tta == "flips-rot90"
    assert json.loads((tta_bundle / MANIFEST).read_text())["tta"] == "flips-rot90"
    assert load_bundle(tiny_run / "bundle").manifest.tta == "none"  # opt-in at bundle time
    assert ModelRuntime(load_bundle(tiny_run / "bundle"), CPU).views == 1


def test_tta_probabilities_are_the_mean_over_the_eight_views(tta_bundle: Path) -> None:
    runtime = ModelRuntime(load_bundle(tta_bundle), CPU)
    assert runtime.views == 8
    tiles = _noise(runtime.input_size)
    out = runtime.infer(tiles)
    # the views built here independently of appliance.model.tta
    views = [np.rot90(t, k, axes=(2, 3)) for t in (tiles, np.flip(tiles, axis=3))
             for k in range(4)]
    per_view = [runtime.probs(runtime.features(np.ascontiguousarray(v))) for v in views]
    np.testing.assert_allclose(out.probs, np.mean(per_view, axis=0), atol=1e-6)
    assert np.abs(out.probs - per_view[0]).max() > 1e-4  # TTA changed something
    plain = runtime.features(tiles)
    np.testing.assert_allclose(out.features, plain, atol=1e-6)  # features: the tile as it is
    np.testing.assert_allclose(out.embedding, runtime.embed(plain), atol=1e-6)


def test_box_tta_off_restores_the_plain_path(tta_bundle: Path, tmp_path: Path) -> None:
    tiles = _noise(32)
    off = open_runtime(load_bundle(tta_bundle),
                       Settings(model={"tta": "off", "providers": ["cpu"], "warmup": False},
                                paths={"state": tmp_path}))
    assert off.views == 1
    out = off.infer(tiles)
    feats = off.features(tiles)
    np.testing.assert_allclose(out.probs, off.probs(feats), atol=1e-7)
    np.testing.assert_allclose(out.embedding, off.embed(feats), atol=1e-7)


def test_evaluate_measures_with_and_without_tta(tiny_run: Path, tta_bundle: Path) -> None:
    on = evaluate(tta_bundle, run=tiny_run / "run", split="val")
    off = evaluate(tta_bundle, run=tiny_run / "run", split="val", tta="off")
    plain = evaluate(tiny_run / "bundle", run=tiny_run / "run", split="val")
    assert (on["views"], off["views"], plain["views"]) == (8, 1, 1)
    assert off["overall_accuracy"] == plain["overall_accuracy"]  # same graphs, plain path
    assert on["chips"] == off["chips"] > 0
