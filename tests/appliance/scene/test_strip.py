"""The tile resampler: native strips resized by OpenCV, for every dtype and band count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.config import InputConfig
from appliance.scene.raster import open_scene
from appliance.scene.strip import NativeStrip
from tests.helpers.scenes import SPEC, write_scene


class _Identity:
    def apply(self, raw: np.ndarray, axis: int = 0) -> np.ndarray:
        return raw.astype(np.float32)


NEUTRAL = np.asarray([7.0, 8.0], np.float32).reshape(-1, 1, 1)


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16", "int32", "uint32",
                                   "float32", "float64"])
def test_every_dtype_shrinks_and_enlarges_a_constant_exactly(dtype: str) -> None:
    raw = np.stack([np.full((40, 60), 5), np.full((40, 60), 9)]).astype(dtype)
    strip = NativeStrip.of(0, 0, raw, _Identity(), NEUTRAL)
    for out in (16, 96):  # area averaging, bilinear
        tile = strip.window(10, 0, 40, 40, out, out)
        assert tile.shape == (2, out, out) and tile.dtype == np.float32
        assert np.all(tile[0] == 5) and np.all(tile[1] == 9)


def test_many_bands_of_16_bit_data_shrink(tmp_path: Path) -> None:
    # OpenCV's area resize refuses more than 4 channels of uint16 at once: bands go alone
    raw = np.arange(13 * 64 * 64, dtype=np.uint16).reshape(13, 64, 64)
    strip = NativeStrip.of(0, 0, raw, _Identity(), np.zeros((13, 1, 1), np.float32))
    tile = strip.window(0, 0, 64, 64, 32, 32)
    want = raw.astype(np.float64).reshape(13, 32, 2, 32, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(tile, want, atol=0.5)  # a 2x2 mean, rounded to integers


def test_outside_the_strip_and_non_finite_values_are_neutral() -> None:
    raw = np.ones((2, 8, 8), np.float32)
    raw[:, 0, 0] = np.nan
    strip = NativeStrip.of(100, 200, raw, _Identity(), NEUTRAL)
    tile = strip.window(96, 200, 16, 8, 16, 8)  # 4 px left of the strip, 4 px right
    assert np.all(tile[:, :, :4] == NEUTRAL) and np.all(tile[:, :, 12:] == NEUTRAL)
    assert np.all(tile[:, 0, 4] == NEUTRAL[:, 0, 0])  # the NaN pixel
    assert np.all(tile[:, 1:, 5:12] == 1.0)
    assert np.all(strip.window(0, 0, 8, 8, 4, 4) == NEUTRAL)  # wholly outside


def test_a_window_read_is_a_strip_read_of_the_same_pixels(tmp_path: Path) -> None:
    path = write_scene(tmp_path / "s.tif", size=(64, 64), noise=40)
    with open_scene(path, InputConfig(), SPEC) as scene:
        strip = scene.read_strip(-8, 0, 80, 32)  # reaches past the left and right edges
        assert (strip.col, strip.row, strip.raw.shape) == (0, 0, (3, 32, 64))
        np.testing.assert_array_equal(scene.read_window(-8, 0, 32, 32, 48, 48),
                                      strip.window(-8, 0, 32, 32, 48, 48))
        native = scene.read_window(0, 0, 64, 32, 64, 32)  # same size: the pixels themselves
        np.testing.assert_array_equal(native, scene.rescale.apply(strip.raw))
