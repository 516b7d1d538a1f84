"""Per-label scene outputs of a multi-label bundle on real GeoTIFFs with real ONNX.

The colour bundle as a multi-label bundle (tests/helpers/colour_bundle.py) gives each colour
channel its own sigmoid, so yellow is urban AND vegetation. A scene of four quadrants (red,
yellow, blue, green) therefore holds urban on half its area, vegetation on half, water on a
quarter: the per-label shares a single-label map cannot give (it reports the arg-max).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from pydantic import ValidationError
from rasterio.transform import Affine

from appliance.config import Settings
from appliance.contract.bundle import load_bundle
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.scene.outputs import NODATA
from appliance.scene.pipeline import SceneOutcome, process_scene
from tests.helpers.colour_bundle import ML_THRESHOLDS, build_colour_bundle

QUADRANTS = {(0, 0): (200, 30, 30), (0, 1): (200, 200, 30), (1, 0): (30, 30, 200),
             (1, 1): (30, 200, 30)}
TRUTH = {"urban": 0.5, "vegetation": 0.5, "water": 0.25}


@pytest.fixture(scope="module")
def ml_runtime(tmp_path_factory: pytest.TempPathFactory) -> ModelRuntime:
    bundle = build_colour_bundle(tmp_path_factory.mktemp("ml") / "bundle", multi_label=True)
    return ModelRuntime(load_bundle(bundle), ProviderPlan(providers=("cpu",)))


def quadrant_scene(path: Path, side: int = 128) -> Path:
    data = np.zeros((3, side, side), np.uint8)
    half = side // 2
    for (r, c), colour in QUADRANTS.items():
        data[:, r * half:(r + 1) * half, c * half:(c + 1) * half] = np.asarray(colour)[:, None,
                                                                                      None]
    with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3,
                       dtype="uint8", crs="EPSG:32633",
                       transform=Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)) as dst:
        dst.write(data)
    return path


def run(tmp: Path, runtime: ModelRuntime, **sections: Any) -> SceneOutcome:
    settings = Settings.model_validate({"model": {"providers": ["cpu"]},
                                        "tiling": {"scales": [16], "batch_size": 16},
                                        **sections})
    return process_scene(quadrant_scene(tmp / "quad.tif"), "cd" * 32, tmp / "out", runtime,
                         settings)


def test_label_shares_maps_and_polygons(tmp_path: Path, ml_runtime: ModelRuntime) -> None:
    out = run(tmp_path, ml_runtime)
    assert out.labels is not None
    assert {n: s.fraction for n, s in out.labels.items()} == pytest.approx(TRUTH)
    total_ha = sum(out.areas_ha.values())
    for name, share in out.labels.items():
        assert share.area_ha == pytest.approx(TRUTH[name] * total_ha, rel=1e-6)
    # the arg-max map cannot say this: its shares sum to one
    assert sum(out.fractions.values()) == pytest.approx(1.0)

    with rasterio.open(out.outputs["labels"]) as ds:
        assert ds.count == 3 and ds.descriptions == ("urban", "vegetation", "water")
        assert ds.dtypes == ("uint8",) * 3 and ds.nodata == NODATA
        assert json.loads(ds.tags()["LABELS"]) == ["urban", "vegetation", "water"]
        percent = ds.read()
    assert percent.shape == (3, 8, 8) and percent.max() <= 100
    assert (percent[0, :4, 4:] > 90).all() and (percent[1, :4, 4:] > 90).all()  # yellow
    assert (percent[2, :4, :] < 10).all()  # no water in the top half
    with rasterio.open(out.outputs["presence"]) as ds:
        presence = ds.read()
        assert json.loads(ds.tags()["THRESHOLDS"]) == ML_THRESHOLDS
        assert ds.descriptions == ("urban", "vegetation", "water")
    assert presence[:, :, :].sum(axis=(1, 2)).tolist() == [32, 32, 16]

    for name in TRUTH:
        doc = json.loads(Path(out.outputs[f"label-{name}"]).read_text())
        assert doc["features"] and {f["properties"]["label"] for f in doc["features"]} == {name}
    water = json.loads(Path(out.outputs["label-water"]).read_text())["features"]
    assert len(water) == 1 and water[0]["geometry"]["type"] == "Polygon"

    summary = json.loads(Path(out.outputs["summary"]).read_text())
    assert {n: v["fraction"] for n, v in summary["labels"].items()} == pytest.approx(TRUTH)
    assert summary["label_thresholds"] == ML_THRESHOLDS
    item = json.loads(Path(out.outputs["stac"]).read_text())
    assert item["properties"]["terratile:labels"]["water"]["fraction"] == pytest.approx(0.25)
    assert {"labels", "presence", "label-urban"} <= set(item["assets"])
    assert item["assets"]["labels"]["href"] == "labels.tif"
    payload = json.loads(out.result("n1", None).model_dump_json())
    assert payload["labels"]["vegetation"] == pytest.approx(
        {"fraction": 0.5, "area_ha": 0.5 * total_ha})


def test_config_thresholds_override_the_bundle(tmp_path: Path, ml_runtime: ModelRuntime) -> None:
    out = run(tmp_path, ml_runtime, labels={"thresholds": {"water": 1.0, "unknown": 0.2}})
    assert out.labels is not None and out.label_thresholds is not None
    assert out.labels["water"].fraction == 0.0  # no probability reaches 1.0
    assert out.labels["urban"].fraction == pytest.approx(0.5)  # the bundle's own threshold
    assert out.label_thresholds == {**ML_THRESHOLDS, "water": 1.0}
    with pytest.raises(ValidationError, match="thresholds must lie in"):
        Settings.model_validate({"labels": {"thresholds": {"water": 1.5}}})


def test_single_label_bundles_write_no_label_outputs(tmp_path: Path,
                                                     colour_bundle: Path) -> None:
    runtime = ModelRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cpu",)))
    out = run(tmp_path, runtime)
    assert out.labels is None and "labels" not in out.outputs
    assert out.result("n1", None).labels is None
    assert "labels" not in json.loads(Path(out.outputs["summary"]).read_text())
