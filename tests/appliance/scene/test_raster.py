"""Raster reading: validation, band mapping, rescaling, nodata, windowed tile reads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio

from appliance.config import InputConfig
from appliance.scene.raster import SceneError, open_scene
from tests.helpers.colour_bundle import PURE
from tests.helpers.scenes import SPEC, halves, write_scene


def cfg(**kw: object) -> InputConfig:
    return InputConfig.model_validate(kw)


def test_uint8_scene_is_read_unscaled(tmp_path: Path) -> None:
    path = write_scene(tmp_path / "s.tif", size=(64, 64))
    with open_scene(path, cfg(), SPEC) as scene:
        assert scene.rescale.mode == "none"
        assert scene.bands == [1, 2, 3]
        tile = scene.read_window(0, 0, 16, 16, 32, 32)  # inside the red left half
    assert tile.shape == (3, 32, 32) and tile.dtype == np.float32
    np.testing.assert_allclose(tile[:, 16, 16], PURE["urban"])


def test_uint16_percentile_with_band_selection(tmp_path: Path) -> None:
    # 4 bands, colours stored as b,g,r in bands 3,2,1 (0-based 2,1,0), x40 into uint16 range
    path = write_scene(tmp_path / "s2.tif", bands=4, dtype="uint16", gain=40, offset=100,
                       band_order=(2, 1, 0), size=(64, 64))
    with open_scene(path, cfg(bands=[3, 2, 1]), SPEC) as scene:
        assert scene.rescale.mode == "percentile"
        red = scene.read_window(0, 0, 16, 16, 32, 32)[:, 16, 16]
        green = scene.read_window(48, 0, 16, 16, 32, 32)[:, 16, 16]
    assert red.argmax() == 0 and green.argmax() == 1
    assert red[0] == pytest.approx(255.0) and red[1] == pytest.approx(0.0, abs=1e-3)
    # blue is 0 everywhere: a constant band has no spread to stretch, it maps mid-range
    assert red[2] == pytest.approx(127.5) and green[2] == pytest.approx(127.5)


def test_linear_rescale(tmp_path: Path) -> None:
    path = write_scene(tmp_path / "s.tif", dtype="uint16", gain=10, size=(32, 32))
    conf = cfg(rescale={"mode": "linear", "factor": 0.1, "offset": 0.0})
    with open_scene(path, conf, SPEC) as scene:
        tile = scene.read_window(0, 0, 16, 16, 16, 16)
    np.testing.assert_allclose(tile[:, 8, 8], PURE["urban"], atol=1e-3)


def test_statistics_exclude_nodata(tmp_path: Path) -> None:
    # values 40*colour+1000 inside, nodata 0 border: a 2 % percentile of 0 would be wrong
    path = write_scene(tmp_path / "s.tif", dtype="uint16", gain=40, offset=1000, nodata=0,
                       border=12, size=(64, 64))
    with open_scene(path, cfg(), SPEC) as scene:
        assert scene.nodata == 0
        assert not scene.overview_valid.all() and scene.overview_valid.any()
        gain, bias = scene.rescale.gain, scene.rescale.bias
        sample = scene.band_sample()
    stretched = gain > 0  # blue is constant (1000): gain 0, mid-range
    assert (-bias[stretched] / gain[stretched] >= 1000).all()
    assert not stretched[2] and bias[2] == pytest.approx(127.5)
    assert sample.shape[1] == 3 and len(sample) == int(scene.overview_valid.sum())
    assert sample.min() >= 0 and sample.max() <= 255


def test_nodata_override_from_config(tmp_path: Path) -> None:
    path = write_scene(tmp_path / "s.tif", nodata=None, size=(32, 32), layout=halves(32, 32))
    with open_scene(path, cfg(nodata=30), SPEC) as scene:  # 30 is not in every band: valid
        assert scene.nodata == 30 and scene.overview_valid.all()


def test_float_scene_with_nan_nodata(tmp_path: Path) -> None:
    path = write_scene(tmp_path / "f.tif", dtype="float32", gain=1 / 255, nodata=float("nan"),
                       border=4, size=(32, 32))
    with open_scene(path, cfg(), SPEC) as scene:
        assert scene.rescale.mode == "percentile"
        assert not scene.overview_valid[0].any() and scene.overview_valid[16].any()
        tile = scene.read_window(-8, -8, 16, 16, 16, 16)
    assert np.isfinite(tile).all()


def test_window_past_the_edge_is_padded_with_neutral(tmp_path: Path) -> None:
    path = write_scene(tmp_path / "s.tif", size=(32, 32))
    with open_scene(path, cfg(), SPEC) as scene:
        tile = scene.read_window(-16, -16, 32, 32, 32, 32)
    np.testing.assert_allclose(tile[:, 0, 0], [127.5] * 3)  # outside: neutral
    np.testing.assert_allclose(tile[:, 24, 24], PURE["urban"])  # inside: the scene


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p.write_bytes(b""), "unreadable"),
        (lambda p: p.write_text("not a raster\n" * 50), "unreadable"),
        (lambda p: write_scene(p, bands=2), "bands"),
    ],
    ids=["zero-byte", "text", "two-bands"],
)
def test_bad_inputs_are_rejected_with_reason(
    tmp_path: Path, make: Callable[[Path], object], reason: str
) -> None:
    path = tmp_path / "bad.tif"
    make(path)
    with pytest.raises(SceneError) as err:
        open_scene(path, cfg(), SPEC)
    assert err.value.reason == reason


def test_band_index_beyond_count(tmp_path: Path) -> None:
    path = write_scene(tmp_path / "s.tif", bands=3)
    with pytest.raises(SceneError, match="asks for band 4") as err:
        open_scene(path, cfg(bands=[4, 2, 1]), SPEC)
    assert err.value.reason == "bands"


def test_truncated_geotiff_fails_on_read(tmp_path: Path) -> None:
    full = write_scene(tmp_path / "full.tif", size=(512, 512), noise=20)
    data = full.read_bytes()
    cut = tmp_path / "cut.tif"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(SceneError) as err:
        open_scene(cut, cfg(), SPEC)
    assert err.value.reason == "unreadable" and "read failed" in err.value.message


def test_all_nodata_scene(tmp_path: Path) -> None:
    path = write_scene(tmp_path / "s.tif", nodata=0, border=100, size=(32, 32))
    with pytest.raises(SceneError) as err:
        open_scene(path, cfg(), SPEC)
    assert err.value.reason == "nodata"


def test_scene_without_georeferencing(tmp_path: Path) -> None:
    path = tmp_path / "plain.tif"
    with rasterio.open(path, "w", driver="GTiff", width=16, height=16, count=3,
                       dtype="uint8") as dst:
        dst.write(np.zeros((3, 16, 16), np.uint8))
    with pytest.raises(SceneError) as err:
        open_scene(path, cfg(), SPEC)
    assert err.value.reason == "no-crs"


@pytest.mark.parametrize("overviews", [False, True], ids=["strips", "gdal-overviews"])
def test_per_dataset_mask_is_respected(tmp_path: Path, overviews: bool) -> None:
    path = write_scene(tmp_path / "m.tif", size=(64, 64))
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "r+") as dst:
        mask = np.full((64, 64), 255, np.uint8)
        mask[:, :16] = 0  # the left quarter is masked out
        dst.write_mask(mask)
        if overviews:
            dst.build_overviews([2, 4])
    with open_scene(path, cfg(rescale={"sample_size": 64}), SPEC) as scene:
        assert scene.has_mask and scene.nodata is None
        _, valid = scene.read_decimated((16, 16))
    assert not valid[:, :4].any() and valid[:, 4:].all()
