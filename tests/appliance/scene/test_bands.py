"""Bands by meaning: scene bands matched to the model's by name, or a failure saying what to set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rasterio.enums import ColorInterp as CI

from appliance.config import InputConfig, Settings
from appliance.contract.bundle import load_bundle
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.scene.bands import common_name, positional_bands
from appliance.scene.pipeline import SceneError, process_scene
from appliance.scene.raster import open_scene
from tests.helpers.scenes import SPEC, quarters, write_scene

BGRN = [CI.blue, CI.green, CI.red, CI.undefined]


@pytest.fixture(scope="module")
def runtime(colour_bundle: Path) -> ModelRuntime:
    return ModelRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cpu",)))


def bgrn(path: Path, **kw: object) -> Path:
    """A 4-band uint16 blue-green-red-NIR scene: red in band 3, blue in band 1."""
    return write_scene(path, bands=4, dtype="uint16", gain=40, offset=300, band_order=(2, 1, 0),
                       size=(128, 128), layout=quarters(128, 128), noise=20, **kw)  # type: ignore[arg-type]


def settings(**input_: object) -> Settings:
    return Settings.model_validate({"model": {"providers": ["cpu"]},
                                    "tiling": {"scales": [16, 32]}, "input": input_})


def test_common_names() -> None:
    assert [common_name(x) for x in ("B04", "Red", "SR_B5", "nir08", "B8A", "pan", "x")] == [
        "red", "red", "nir", "nir", "nir", "pan", None]


def test_bgrn_with_colour_interpretation_runs_on_red_green_blue(
        tmp_path: Path, runtime: ModelRuntime) -> None:
    scene = bgrn(tmp_path / "bgrn.tif", colorinterp=BGRN)
    out = process_scene(scene, "ab" * 32, tmp_path / "out", runtime, settings())
    assert out.fractions == pytest.approx({"urban": 0.5, "vegetation": 0.25, "water": 0.25})
    assert [(b.band, b.index, b.label) for b in out.input.bands] == [
        ("red", 3, "red"), ("green", 2, "green"), ("blue", 1, "blue")]
    assert out.input.band_selection == "metadata"
    summary = json.loads(Path(out.outputs["summary"]).read_text())
    assert [b["index"] for b in summary["input"]["bands"]] == [3, 2, 1]
    item = json.loads(Path(out.outputs["stac"]).read_text())
    assert [b["index"] for b in item["properties"]["terratile:input"]["bands"]] == [3, 2, 1]
    assert out.result("n", None).input.rescale.mode == "percentile"


def test_sentinel_band_descriptions_are_matched(tmp_path: Path) -> None:
    scene = bgrn(tmp_path / "s2.tif", descriptions=["B02", "B03", "B04", "B08"])
    with open_scene(scene, InputConfig(), SPEC) as s:
        assert s.bands == [3, 2, 1] and s.band_choice.how == "metadata"


def test_bgrn_without_band_metadata_fails_with_what_to_set(
        tmp_path: Path, runtime: ModelRuntime) -> None:
    scene = bgrn(tmp_path / "plain.tif")
    with pytest.raises(SceneError) as err:
        process_scene(scene, "ab" * 32, tmp_path / "out", runtime, settings())
    assert err.value.reason == "bands"
    assert "has 4 bands" in err.value.message
    assert "set input.bands: [<red>, <green>, <blue>]" in err.value.message
    assert not (tmp_path / "out" / "landuse.tif").exists()


def test_input_bands_accepts_names_and_numbers(tmp_path: Path) -> None:
    scene = bgrn(tmp_path / "named.tif", descriptions=["B02", "B03", "B04", "B08"])
    with open_scene(scene, InputConfig(bands=["B04", "green", 1]), SPEC) as s:
        assert s.bands == [3, 2, 1] and s.band_choice.how == "config"
    with pytest.raises(SceneError, match="has no band called that"):
        open_scene(scene, InputConfig(bands=["swir16", "green", "blue"]), SPEC)


def test_a_grey_band_for_an_rgb_model_says_how_to_repeat_it(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "grey.tif", bands=1)
    with pytest.raises(SceneError) as err:
        open_scene(scene, InputConfig(), SPEC)
    assert err.value.reason == "bands"
    assert "set input.bands: [1, 1, 1]" in err.value.message
    with open_scene(scene, InputConfig(bands=[1, 1, 1]), SPEC) as s:
        assert s.bands == [1, 1, 1] and s.read_window(0, 0, 16, 16, 8, 8).shape == (3, 8, 8)


def test_n_unnamed_bands_for_an_n_band_model_are_taken_in_order(tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "three.tif", colorinterp=[CI.gray, CI.undefined,
                                                             CI.undefined])
    with open_scene(scene, InputConfig(), SPEC) as s:
        assert s.bands == [1, 2, 3] and s.band_choice.how == "order"


def test_picture_chips_resolve_names_by_model_order() -> None:
    assert positional_bands(None, ["red", "green", "blue"]) == [1, 2, 3]
    assert positional_bands(["blue", 2, "red"], ["red", "green", "blue"]) == [3, 2, 1]


def test_config_rejects_band_zero() -> None:
    with pytest.raises(ValueError, match="1-based"):
        InputConfig(bands=[0, 1, 2])
