"""process_scene end to end on real GeoTIFFs with a real ONNX bundle (the colour classifier)."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from PIL import Image

from appliance.config import Settings
from appliance.contract.bundle import load_bundle
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.scene.outputs import NODATA
from appliance.scene.pipeline import SceneError, SceneOutcome, process_scene
from tests.conftest import shared_data
from tests.helpers.geo import local_area
from tests.helpers.scenes import halves, quarters, write_scene


@pytest.fixture(scope="module")
def runtime(colour_bundle: Path) -> ModelRuntime:
    return ModelRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cpu",)))


def settings(**sections: Any) -> Settings:
    tiling = {"scales": [16, 32], "batch_size": 16, **sections.pop("tiling", {})}
    return Settings.model_validate({"model": {"providers": ["cpu"]}, "tiling": tiling,
                                    **sections})


def run(path: Path, runtime: ModelRuntime, tmp: Path, **sections: Any) -> SceneOutcome:
    return process_scene(path, "ab" * 32, tmp / "out", runtime, settings(**sections))


def test_three_band_uint8(tmp_path: Path, runtime: ModelRuntime) -> None:
    scene = write_scene(tmp_path / "rgb.tif", size=(128, 128), layout=halves(128, 128))
    out = run(scene, runtime, tmp_path)
    assert out.fractions == pytest.approx({"urban": 0.5, "vegetation": 0.5, "water": 0.0})
    # 128² px of 10 m, UTM 33N on the central meridian (k = 0.9996)
    assert sum(out.areas_ha.values()) == pytest.approx(163.84 / 0.9996**2, rel=1e-3)
    assert out.tiles == 64 * 2 and out.mean_confidence > 0.9
    assert set(out.timings) == {"read", "infer", "write", "total"}
    assert set(out.outputs) == {"landuse", "confidence", "summary", "geojson", "stac",
                                "quicklook", "style"}
    assert all(Path(p).is_file() and Path(p).is_absolute() for p in out.outputs.values())
    assert scene.is_file()  # never moved
    cells = out.cells
    assert len(cells) == 64 and cells.probs.shape == (64, 3) and cells.valid.all()
    assert cells.embeddings.shape == (64, 6)
    np.testing.assert_allclose(np.linalg.norm(cells.embeddings, axis=1), 1.0, atol=1e-5)
    assert cells.sample_features.shape == (64, 2, 8) and len(cells.sample_index) == 64
    assert cells.band_sample.shape == (128 * 128, 3)
    assert cells.labels.reshape(8, 8)[:, :4].tolist() == [[0] * 4] * 8
    summary = json.loads(Path(out.outputs["summary"]).read_text())
    assert summary["classes"]["urban"]["area_ha"] == pytest.approx(out.areas_ha["urban"])
    assert summary["cells"] == {"total": 64, "valid": 64, "nodata": 0}


def test_outputs_match_the_input_crs_and_bounds(tmp_path: Path, runtime: ModelRuntime) -> None:
    scene = write_scene(tmp_path / "s.tif", size=(100, 120))  # not a multiple of the cell
    out = run(scene, runtime, tmp_path)
    with rasterio.open(scene) as src:
        crs, b, res = src.crs, src.bounds, src.res
    for key in ("landuse", "confidence"):
        with rasterio.open(out.outputs[key]) as ds:
            assert ds.crs == crs
            assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
            # the map covers exactly the scene: no overhang, no unclassified sliver
            assert tuple(ds.bounds) == pytest.approx(tuple(b))
            assert (ds.read(1) != NODATA).all()
    assert out.bounds == pytest.approx(tuple(b)) and res == (10.0, 10.0)
    with rasterio.open(out.outputs["landuse"]) as ds:
        assert ds.colormap(1)[0][:3] == (200, 40, 40) and ds.tags(1)["CLASS_2"] == "water"
        assert ds.shape == (6, 8)


def test_four_band_uint16_with_band_selection(tmp_path: Path, runtime: ModelRuntime) -> None:
    scene = write_scene(tmp_path / "s2.tif", bands=4, dtype="uint16", gain=40, offset=300,
                        band_order=(2, 1, 0), size=(128, 128), layout=quarters(128, 128),
                        noise=20)
    out = run(scene, runtime, tmp_path, input={"bands": [3, 2, 1]})
    assert out.fractions == pytest.approx({"urban": 0.5, "vegetation": 0.25, "water": 0.25})
    summary = json.loads(Path(out.outputs["summary"]).read_text())
    assert summary["input"]["rescale"]["mode"] == "percentile"
    assert [b["index"] for b in summary["input"]["bands"]] == [3, 2, 1]
    assert summary["input"]["band_selection"] == "config"


def test_nodata_border_cells_are_nodata(tmp_path: Path, runtime: ModelRuntime) -> None:
    scene = write_scene(tmp_path / "nd.tif", size=(128, 128), nodata=0, border=16)
    out = run(scene, runtime, tmp_path)
    with rasterio.open(out.outputs["landuse"]) as ds:
        labels = ds.read(1)
    with rasterio.open(out.outputs["confidence"]) as ds:
        conf = ds.read(1)
    assert (labels[0] == NODATA).all() and (labels[:, -1] == NODATA).all()
    assert (labels[1:-1, 1:-1] != NODATA).all() and (conf[1:-1, 1:-1] <= 100).all()
    assert (conf[0] == NODATA).all()
    assert int((~out.cells.valid).sum()) == 64 - 36
    assert out.fractions == pytest.approx({"urban": 0.5, "vegetation": 0.5, "water": 0.0})
    assert sum(out.areas_ha.values()) == pytest.approx(96 * 96 * 100 / 1e4 / 0.9996**2, rel=1e-3)
    assert set(out.cells.sample_index.tolist()) <= set(np.flatnonzero(out.cells.valid).tolist())


def test_geographic_scene_areas(tmp_path: Path, runtime: ModelRuntime) -> None:
    scene = write_scene(tmp_path / "geo.tif", crs="EPSG:4326", size=(128, 128))
    out = run(scene, runtime, tmp_path)
    assert out.crs == "EPSG:4326"
    expected_ha = local_area(45.0 - 0.0064, 0.0128, 0.0128) / 1e4
    assert sum(out.areas_ha.values()) == pytest.approx(expected_ha, rel=1e-3)
    assert out.bounds_wgs84 == pytest.approx(out.bounds)
    doc = json.loads(Path(out.outputs["geojson"]).read_text())
    assert {f["properties"]["class"] for f in doc["features"]} == {"urban", "vegetation"}


def test_geojson_stac_and_quicklook(tmp_path: Path, runtime: ModelRuntime) -> None:
    scene = write_scene(tmp_path / "s.tif", size=(128, 128), layout=quarters(128, 128))
    out = run(scene, runtime, tmp_path)
    doc = json.loads(Path(out.outputs["geojson"]).read_text())
    assert len(doc["features"]) == 3
    for feature in doc["features"]:
        lon, lat = np.asarray(feature["geometry"]["coordinates"][0]).T
        assert (abs(lon - 15.0) < 0.05).all() and (abs(lat - 45.15) < 0.05).all()
    item = json.loads(Path(out.outputs["stac"]).read_text())
    assert item["stac_version"] == "1.1.0" and item["id"] == out.scene_id
    assert item["properties"]["proj:code"] == "EPSG:32633"
    assert item["properties"]["proj:shape"] == [128, 128]
    assert set(item["assets"]) == {"landuse", "confidence", "summary", "geojson", "quicklook",
                                   "style"}
    assert item["bbox"] == pytest.approx(list(out.bounds_wgs84), abs=1e-6)
    with Image.open(out.outputs["quicklook"]) as im:
        assert im.format == "PNG"


def test_weighted_fusion_and_hybrid_map(tmp_path: Path, runtime: ModelRuntime) -> None:
    scene = write_scene(tmp_path / "s.tif", size=(128, 128), layout=quarters(128, 128))
    out = run(scene, runtime, tmp_path,
              tiling={"fusion": "weighted", "weights": [1.0, 0.0], "segments": "slic",
                      "segment_scale": 16})
    with rasterio.open(out.outputs["hybrid"]) as ds:
        hybrid = ds.read(1)
        assert ds.bounds == pytest.approx(tuple(out.bounds))
    assert hybrid[10, 10] == 0 and hybrid[10, 100] == 1 and hybrid[100, 100] == 2
    assert out.fractions == pytest.approx({"urban": 0.5, "vegetation": 0.25, "water": 0.25})


def test_read_ahead_zero_gives_the_same_result(tmp_path: Path, runtime: ModelRuntime) -> None:
    scene = write_scene(tmp_path / "s.tif", size=(96, 96), noise=30)
    a = run(scene, runtime, tmp_path / "a", tiling={"read_ahead": 0})
    b = run(scene, runtime, tmp_path / "b", tiling={"read_ahead": 3, "batch_size": 5})
    np.testing.assert_allclose(a.cells.probs, b.cells.probs, atol=1e-6)


def _truncated(path: Path) -> None:
    full = write_scene(path.with_name("full.tif"), size=(512, 512), noise=20)
    data = full.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(b""), "unreadable"),
        (lambda p: p.write_text("id,value\n1,2\n"), "unreadable"),
        (_truncated, "unreadable"),
        (lambda p: write_scene(p, bands=2), "bands"),
        (lambda p: write_scene(p, size=(64, 64), nodata=0, border=40), "nodata"),
        (lambda p: write_scene(p, size=(6, 6), tiled=False), "too-small"),
    ],
    ids=["zero-byte", "text", "truncated", "too-few-bands", "all-nodata", "tiny"],
)
def test_bad_scenes_raise_scene_error(
    tmp_path: Path, runtime: ModelRuntime, make: Any, reason: str
) -> None:
    path = tmp_path / "bad.tif"
    make(path)
    size = path.stat().st_size
    with pytest.raises(SceneError) as err:
        run(path, runtime, tmp_path)
    assert err.value.reason == reason and err.value.message
    assert path.stat().st_size == size  # the input is left as it was


def test_shared_rgb_byte_nodata_border(tmp_path: Path, runtime: ModelRuntime) -> None:
    path = shared_data() / "scenes" / "RGB.byte.tif"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    out = process_scene(path, "ef" * 32, tmp_path / "out", runtime,
                        settings(tiling={"scales": [32, 64]}))
    with rasterio.open(path) as src, rasterio.open(out.outputs["landuse"]) as ds:
        assert ds.crs == src.crs
        assert (ds.bounds.left, ds.bounds.top) == pytest.approx((src.bounds.left, src.bounds.top))
        labels = ds.read(1)
    # the scene is a rotated footprint in a black (nodata 0) frame: corners are nodata
    assert labels[0, 0] == labels[0, -1] == labels[-1, 0] == labels[-1, -1] == NODATA
    rows, cols = labels.shape
    assert labels[rows // 2, cols // 2] != NODATA
    valid = out.cells.valid
    assert 0.3 < valid.mean() < 0.95
    assert math.isclose(sum(out.fractions.values()), 1.0, rel_tol=1e-6)


class _FailingRuntime(ModelRuntime):
    """The real runtime, with a fault injected on the third batch."""

    calls = 0

    def infer(self, tiles: np.ndarray, domain: str | None = None) -> Any:
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("injected inference failure")
        return super().infer(tiles, domain)


def test_inference_error_stops_the_reader(tmp_path: Path, colour_bundle: Path) -> None:
    runtime = _FailingRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cpu",)))
    scene = write_scene(tmp_path / "s.tif", size=(256, 256))
    with pytest.raises(RuntimeError, match="injected"):
        run(scene, runtime, tmp_path, tiling={"batch_size": 4, "read_ahead": 2})
    assert not [t for t in threading.enumerate() if t.name == "tile-reader"]
    assert not (tmp_path / "out" / "landuse.tif").exists()


def test_the_bundles_scales_are_the_default(tmp_path: Path, runtime: ModelRuntime) -> None:
    """``terratile-export bundle --scales`` sets what the box tiles with; config overrides."""
    scene = write_scene(tmp_path / "rgb.tif", size=(96, 96), layout=halves(96, 96))
    plain = process_scene(scene, "ab" * 32, tmp_path / "a", runtime,
                          Settings.model_validate({"model": {"providers": ["cpu"]}}))
    summary = json.loads(Path(plain.outputs["summary"]).read_text())
    assert runtime.manifest.scales == [16, 32]
    assert summary["grid"]["scales"] == [16, 32] and summary["grid"]["cell"] == 16
    assert plain.tiles == 2 * int(plain.cells.valid.sum())
    own = run(scene, runtime, tmp_path / "b", tiling={"scales": [24], "cell": 24})
    assert json.loads(Path(own.outputs["summary"]).read_text())["grid"]["scales"] == [24]
