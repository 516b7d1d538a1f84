"""Per-label thresholds round-trip through the sealed manifest (and old manifests read as 0.5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from appliance.contract.bundle import BundleError, load_bundle, read_manifest, seal_bundle
from tests.helpers.colour_bundle import ML_THRESHOLDS, build_colour_bundle


def test_thresholds_round_trip_through_the_manifest(tmp_path: Path) -> None:
    bundle = load_bundle(build_colour_bundle(tmp_path / "b", multi_label=True))
    assert bundle.manifest.task == "multi-label"
    np.testing.assert_allclose(bundle.manifest.thresholds, list(ML_THRESHOLDS.values()))
    raw = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert [c["threshold"] for c in raw["classes"]] == list(ML_THRESHOLDS.values())
    # re-sealed with new thresholds (as an override at export would), read back exactly
    manifest = read_manifest(tmp_path / "b")
    changed = manifest.model_copy(update={"classes": [
        c.model_copy(update={"threshold": 0.123}) for c in manifest.classes]})
    seal_bundle(tmp_path / "b", changed)
    assert load_bundle(tmp_path / "b").manifest.thresholds.tolist() == [0.123] * 3


def test_uncalibrated_and_invalid_thresholds(tmp_path: Path) -> None:
    out = build_colour_bundle(tmp_path / "old")  # a manifest written without thresholds
    assert load_bundle(out).manifest.thresholds.tolist() == [0.5] * 3
    raw = json.loads((out / "manifest.json").read_text())
    raw["classes"][0]["threshold"] = 1.5
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(BundleError):
        load_bundle(out)
