"""Ground sampling distance: scenes measured, windows matched to the training ground extent,
metre tiling, and warnings or refusals when a scene's resolution is too far off."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
from rasterio.crs import CRS
from rasterio.transform import Affine, from_origin

from appliance.config import Settings
from appliance.contract.bundle import load_bundle, read_manifest, seal_bundle
from appliance.contract.gsd import scene_gsd
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.scene.pipeline import SceneError, SceneOutcome, process_scene
from tests.helpers.geo import local_area
from tests.helpers.scenes import quarters, write_scene


def gsd_bundle(src: Path, dst: Path, gsd: float, scales: list[int]) -> ModelRuntime:
    """The colour bundle, sealed again as trained at ``gsd`` m with ``scales`` px."""
    shutil.copytree(src, dst)
    seal_bundle(dst, read_manifest(dst).model_copy(update={"gsd": gsd, "scales": scales}))
    return ModelRuntime(load_bundle(dst), ProviderPlan(providers=("cpu",)))


def run(scene: Path, runtime: ModelRuntime, out: Path, **sections: Any) -> SceneOutcome:
    settings = Settings.model_validate({"model": {"providers": ["cpu"]}, **sections})
    return process_scene(scene, "ab" * 32, out, runtime, settings)


def test_utm_gsd_is_the_ground_distance() -> None:
    # on the central meridian the grid is 0.9996 of the ground
    gsd = scene_gsd(from_origin(500000, 5000000, 10, 10), CRS.from_epsg(32633), 100, 100)
    assert gsd == pytest.approx(10 / 0.9996, rel=1e-4)


def test_web_mercator_gsd_shrinks_with_latitude() -> None:
    y = 6378137.0 * math.log(math.tan(math.pi / 4 + math.radians(60) / 2))
    gsd = scene_gsd(from_origin(0, y + 500, 10, 10), CRS.from_epsg(3857), 100, 100)
    assert gsd == pytest.approx(5.0, rel=1e-2)


def test_geographic_gsd_is_converted_at_the_scene_centre() -> None:
    gsd = scene_gsd(from_origin(10.0, 45.0, 1e-4, 1e-4), CRS.from_epsg(4326), 200, 200)
    assert gsd == pytest.approx(math.sqrt(local_area(44.99, 1e-4, 1e-4)), rel=1e-3)


def test_a_scene_at_4x_the_bundle_gsd_gets_matching_ground_windows(
        tmp_path: Path, colour_bundle: Path) -> None:
    runtime = gsd_bundle(colour_bundle, tmp_path / "b", gsd=2.5, scales=[64, 128])
    scene = write_scene(tmp_path / "s.tif", size=(128, 128), layout=quarters(128, 128))  # 10 m
    out = run(scene, runtime, tmp_path / "out")
    res = out.input.resolution
    assert res.matched and res.windows == [16, 32] and res.cell == 16
    assert res.scene_gsd == pytest.approx(10 / 0.9996, rel=1e-4) and res.bundle_gsd == 2.5
    assert res.ratio == pytest.approx(1.0, abs=0.01) and out.warnings == []
    assert out.fractions == pytest.approx({"urban": 0.5, "vegetation": 0.25, "water": 0.25})
    summary = json.loads(Path(out.outputs["summary"]).read_text())
    assert summary["grid"]["scales"] == [16, 32] and summary["input"]["resolution"]["matched"]
    assert json.loads(Path(out.outputs["stac"]).read_text())["properties"]["gsd"] == (
        pytest.approx(10 / 0.9996, rel=1e-4))


def test_a_finer_scene_gets_larger_windows(tmp_path: Path, colour_bundle: Path) -> None:
    runtime = gsd_bundle(colour_bundle, tmp_path / "b", gsd=10.0, scales=[16, 32])
    scene = write_scene(tmp_path / "s.tif", size=(256, 256),
                        transform=Affine(2.5, 0, 500000, 0, -2.5, 5000000))
    out = run(scene, runtime, tmp_path / "out")
    assert out.input.resolution.windows == [64, 128] and out.warnings == []


def test_unmatched_resolution_is_warned_everywhere(tmp_path: Path, colour_bundle: Path) -> None:
    runtime = gsd_bundle(colour_bundle, tmp_path / "b", gsd=2.5, scales=[64, 128])
    scene = write_scene(tmp_path / "s.tif", size=(128, 128))
    out = run(scene, runtime, tmp_path / "out", tiling={"match_gsd": False})
    assert out.input.resolution.windows == [64, 128]
    assert out.input.resolution.ratio == pytest.approx(4.0, rel=1e-3)
    assert len(out.warnings) == 1 and "4x the ground" in out.warnings[0]
    assert out.result("n", None).warnings == out.warnings
    assert json.loads(Path(out.outputs["summary"]).read_text())["warnings"] == out.warnings
    item = json.loads(Path(out.outputs["stac"]).read_text())
    assert item["properties"]["terratile:warnings"] == out.warnings


def test_a_scene_too_coarse_to_match_is_warned(tmp_path: Path, colour_bundle: Path) -> None:
    runtime = gsd_bundle(colour_bundle, tmp_path / "b", gsd=0.5, scales=[16, 32])
    scene = write_scene(tmp_path / "s.tif", size=(128, 128))  # 20x coarser: 0.8 px windows
    out = run(scene, runtime, tmp_path / "out")
    assert not out.input.resolution.matched and out.input.resolution.windows == [16, 32]
    assert any("not matched" in w for w in out.warnings)
    assert any("20x the ground" in w for w in out.warnings)


def test_refuse_policy_fails_with_reason_resolution(tmp_path: Path, colour_bundle: Path) -> None:
    runtime = gsd_bundle(colour_bundle, tmp_path / "b", gsd=2.5, scales=[64, 128])
    scene = write_scene(tmp_path / "s.tif", size=(128, 128))
    with pytest.raises(SceneError) as err:
        run(scene, runtime, tmp_path / "out", tiling={"match_gsd": False},
            input={"gsd_policy": "refuse"})
    assert err.value.reason == "resolution" and "input.gsd_tolerance 2" in err.value.message
    # a looser tolerance accepts it
    out = run(scene, runtime, tmp_path / "out2", tiling={"match_gsd": False},
              input={"gsd_policy": "refuse", "gsd_tolerance": 5})
    assert out.warnings == []


def test_geographic_scene_gets_metre_windows_of_the_right_size(
        tmp_path: Path, colour_bundle: Path) -> None:
    runtime = ModelRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cpu",)))
    scene = write_scene(tmp_path / "geo.tif", crs="EPSG:4326", size=(128, 128))
    out = run(scene, runtime, tmp_path / "out",
              tiling={"units": "metres", "scales": [160, 320], "cell": 160})
    gsd = math.sqrt(local_area(45.0 - 0.0064, 1e-4, 1e-4))  # ~9.3 m at 45°N
    res = out.input.resolution
    assert res.scene_gsd == pytest.approx(gsd, rel=1e-3)
    assert res.windows == [round(160 / gsd), round(320 / gsd)] == [17, 34]
    assert res.cell == 17 and res.matched
