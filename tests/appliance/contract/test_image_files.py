"""The one list of chip suffixes: every suffix in it opens through the appliance's reader
(image queries, ``index add``), upper case too; other image formats are not chips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.contract.bundle import load_bundle
from appliance.contract.image_files import IMAGE_SUFFIXES, RASTER_SUFFIXES, is_image, is_raster
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.retrieval.service import load_image
from tests.helpers.chips import ALL_SUFFIXES, write_chip
from tests.helpers.colour_bundle import INPUT_SIZE, PURE


@pytest.fixture(scope="module")
def runtime(colour_bundle: Path) -> ModelRuntime:
    return ModelRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cpu",)))


def test_suffixes_are_case_insensitive_and_nothing_else_is_a_chip() -> None:
    assert RASTER_SUFFIXES < IMAGE_SUFFIXES
    for name in ("a.tif", "a.TIFF", "b.Jpg", "c.jpeg", "d.PNG"):
        assert is_image(Path(name)), name
    assert is_raster(Path("x.TIF")) and not is_raster(Path("x.png"))
    for name in ("a.jp2", "a.bmp", "a.gif", "a.txt", "tif", "a.tif.bak"):
        assert not is_image(Path(name)), name


@pytest.mark.parametrize("suffix", ALL_SUFFIXES)
def test_every_suffix_opens_in_the_appliance(suffix: str, tmp_path: Path,
                                             runtime: ModelRuntime) -> None:
    tile = load_image(write_chip(tmp_path / f"chip{suffix}", PURE["water"]), runtime)
    assert tile.shape == (3, INPUT_SIZE, INPUT_SIZE) and tile.dtype == np.float32
    probs = runtime.infer(tile[None]).probs[0]
    assert runtime.manifest.class_names[int(probs.argmax())] == "water"
