"""Hostile scene files (issue 16): references (VRT, WMS, /vsicurl/), huge declared sizes,
a full results disk, NaN without a nodata tag, constant bands."""

from __future__ import annotations

import os
import resource
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import Affine

from appliance.config import InputConfig, Settings
from appliance.contract.bundle import load_bundle
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.scene.pipeline import SceneError, process_scene
from appliance.scene.raster import open_scene
from tests.helpers.hostile import Canary, fill, tmpfs, vrt_xml, wms_xml, write_sparse
from tests.helpers.scenes import SPEC, halves, write_scene

VRT_ON = {"drivers": ["GTiff", "COG", "VRT"]}


def cfg(**kw: object) -> InputConfig:
    return InputConfig.model_validate(kw)


def refused(path: Path, conf: InputConfig) -> SceneError:
    with pytest.raises(SceneError) as err:
        open_scene(path, conf, SPEC).close()
    return err.value


@pytest.fixture(scope="module")
def runtime(colour_bundle: Path) -> ModelRuntime:
    return ModelRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cpu",)))


def settings(**inputs: Any) -> Settings:
    return Settings.model_validate({"model": {"providers": ["cpu"]}, "input": inputs,
                                    "tiling": {"scales": [16, 32], "batch_size": 16}})


# -- finding 2: references -------------------------------------------------------------


def test_network_vrt_and_wms_send_no_request(tmp_path: Path) -> None:
    with Canary() as canary:
        vsicurl = tmp_path / "net.vrt"
        vsicurl.write_text(vrt_xml([f"/vsicurl/{canary.url}/x.tif"] * 3))
        # the canary is real: GDAL left to itself fetches from it
        with pytest.raises(rasterio.errors.RasterioError), rasterio.open(vsicurl) as ds:
            ds.read(1)
        assert canary.requests
        canary.requests.clear()
        wms = tmp_path / "wms.tif"  # WMS XML named like a GeoTIFF
        wms.write_text(wms_xml(canary.url))
        curl_tif = tmp_path / "net.tif"  # a VRT named like a GeoTIFF
        curl_tif.write_text(vsicurl.read_text())
        prefixed = tmp_path / "prefixed.tif"  # GDAL finds "<VRTDataset" anywhere in 1 KB
        prefixed.write_text("junk " + vsicurl.read_text())
        assert refused(prefixed, cfg(**VRT_ON)).reason in ("format", "unreadable")
        for path in (vsicurl, wms, curl_tif):
            for conf in (cfg(), cfg(**VRT_ON)):
                assert refused(path, conf).reason == "format", (path, conf)
        assert refused(Path(f"/vsicurl/{canary.url}/x.tif"), cfg()).reason == "format"
        assert canary.requests == []


def test_vrt_refused_by_default_and_only_in_tree_sources_when_allowed(tmp_path: Path) -> None:
    inbox, elsewhere = tmp_path / "inbox", tmp_path / "secret"
    inbox.mkdir()
    elsewhere.mkdir()
    secret = write_scene(elsewhere / "secret.tif", size=(64, 64))
    (inbox / "data").mkdir()
    local = write_scene(inbox / "data" / "local.tif", size=(64, 64))
    outside = inbox / "outside.vrt"
    outside.write_text(vrt_xml([str(secret)] * 3))
    dotdot = inbox / "dotdot.vrt"
    dotdot.write_text(vrt_xml(["../secret/secret.tif"] * 3, relative=True))
    (inbox / "link.tif").symlink_to(secret)
    linked = inbox / "linked.vrt"
    linked.write_text(vrt_xml(["link.tif"] * 3, relative=True))
    nested = inbox / "nested.vrt"
    nested.write_text(vrt_xml(["outside.vrt"] * 3, relative=True))
    shouting = inbox / "case.vrt"  # GDAL reads VRT tags case-insensitively
    shouting.write_text(outside.read_text().replace("SourceFilename", "SOURCEFILENAME"))
    inside = inbox / "inside.vrt"

    inside.write_text(vrt_xml(["data/local.tif"] * 3, relative=True))
    for path in (outside, dotdot, linked, nested, inside):
        assert refused(path, cfg()).reason == "format"
    for path in (outside, dotdot, linked, nested, shouting):
        assert refused(path, cfg(**VRT_ON)).reason == "format", path
    with open_scene(inside, cfg(**VRT_ON), SPEC) as scene, rasterio.open(local) as src:
        assert (scene.width, scene.height) == (64, 64)
        np.testing.assert_allclose(scene.read_window(0, 0, 16, 16, 16, 16),
                                   src.read(window=((0, 16), (0, 16))).astype(np.float32))


def test_only_pixel_drivers_can_be_configured() -> None:
    with pytest.raises(ValueError, match="WMS"):
        cfg(drivers=["GTiff", "WMS"])
    assert cfg(drivers=["GTiff", "VRT"]).drivers == ["GTiff", "VRT"]


def test_a_png_scene_is_a_format_error(tmp_path: Path) -> None:
    png = tmp_path / "scene.tif"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(png, format="PNG")
    assert refused(png, cfg()).reason == "format"


def test_a_text_file_is_still_unreadable(tmp_path: Path) -> None:
    path = tmp_path / "x.tif"
    path.write_text("not a raster\n" * 50)
    assert refused(path, cfg()).reason == "unreadable"


# -- finding 4: declared size ----------------------------------------------------------


def test_sparse_huge_geotiff_is_too_large_before_any_read(tmp_path: Path) -> None:
    path = write_sparse(tmp_path / "huge.tif", 200_000)
    assert path.stat().st_size < 20 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    err = refused(path, cfg())
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert err.reason == "too-large" and "max_pixels" in err.message
    assert grown_mb < 100


def test_a_tiny_vrt_of_huge_declared_size_is_too_large(tmp_path: Path) -> None:
    write_scene(tmp_path / "s.tif", size=(64, 64))
    vrt = tmp_path / "huge.vrt"
    vrt.write_text(vrt_xml(["s.tif"] * 3, size=(200_000, 200_000), relative=True))
    assert vrt.stat().st_size < 2048
    assert refused(vrt, cfg(**VRT_ON)).reason == "too-large"


def test_max_pixels_is_configurable(tmp_path: Path) -> None:
    path = write_scene(tmp_path / "s.tif", size=(64, 64))
    assert refused(path, cfg(max_pixels=64 * 64 - 1)).reason == "too-large"
    open_scene(path, cfg(max_pixels=64 * 64), SPEC).close()


def test_a_huge_block_is_too_large(tmp_path: Path) -> None:
    """One 16384x8192 tile of 3 bands is 384 MB decoded (above the 256 MB a block may be),
    though the sparse file is a few hundred bytes and its pixels are within max_pixels."""
    path = tmp_path / "s.tif"
    with rasterio.open(path, "w", driver="GTiff", width=16384, height=8192, count=3,
                       dtype="uint8", tiled=True, blockxsize=16384, blockysize=8192,
                       sparse_ok=True, crs="EPSG:32633",
                       transform=Affine(10, 0, 500000, 0, -10, 5000000)):
        pass
    assert path.stat().st_size < 4096
    error = refused(path, cfg())
    assert error.reason == "too-large" and "block" in error.message


# -- finding 3: a full results disk ----------------------------------------------------


def test_a_free_space_floor_above_the_free_space_fails_disk_full(
    tmp_path: Path, runtime: ModelRuntime
) -> None:
    scene = write_scene(tmp_path / "s.tif", size=(64, 64))
    with pytest.raises(SceneError) as err:
        process_scene(scene, "ab" * 32, tmp_path / "out", runtime,
                      settings(min_free_mb=1 << 40))
    assert err.value.reason == "disk-full" and "min_free_mb" in err.value.message
    assert list((tmp_path / "out").iterdir()) == []


def test_a_nearly_full_real_disk_is_disk_full_not_a_crash(
    tmp_path: Path, runtime: ModelRuntime
) -> None:
    scene = write_scene(tmp_path / "s.tif", size=(128, 128), layout=halves(128, 128))
    with tmpfs(tmp_path / "small", "256k") as disk:
        if disk is None:
            pytest.skip("cannot mount a tmpfs here (not root)")
        fill(disk)  # then about 4 KB free
        st = os.statvfs(disk)
        assert st.f_bavail * st.f_frsize <= 16 << 10
        with pytest.raises(SceneError) as err:
            process_scene(scene, "ab" * 32, disk / "out", runtime, settings(min_free_mb=0))
        assert err.value.reason == "disk-full"
        with pytest.raises(SceneError) as err:  # the default floor refuses before writing
            process_scene(scene, "ab" * 32, disk / "out2", runtime, settings())
        assert err.value.reason == "disk-full" and "min_free_mb" in err.value.message


# -- finding 11: odd values ------------------------------------------------------------


def test_nan_without_nodata_tag_is_nodata(tmp_path: Path, runtime: ModelRuntime) -> None:
    path = write_scene(tmp_path / "f.tif", dtype="float64", size=(128, 128),
                       layout=halves(128, 128))
    with rasterio.open(path, "r+") as dst:
        assert dst.nodata is None
        data = dst.read()
        data[:, :, :32] = np.nan  # the left quarter (urban)
        data[0, 100:, 64:] = np.inf  # and one band of the bottom right (vegetation)
        dst.write(data)
    out = process_scene(path, "ab" * 32, tmp_path / "out", runtime, settings())
    valid = out.cells.valid.reshape(8, 8)
    assert not valid[:, :2].any() and valid[:6, 2:].all()
    assert not valid[6:, 4:].any()  # rows 100.. : 12 of cell row 6's 16 rows are inf
    assert out.fractions["urban"] == pytest.approx(16 / 40, abs=0.01)
    assert out.fractions["water"] == 0.0


def test_a_constant_band_maps_to_mid_range(tmp_path: Path) -> None:
    path = write_scene(tmp_path / "c.tif", dtype="uint16", gain=40, size=(64, 64),
                       layout=lambda r, c: np.full(np.broadcast(r, c).shape, ""))
    with open_scene(path, cfg(), SPEC) as scene:
        assert scene.rescale.mode == "percentile"
        tile = scene.read_window(8, 8, 16, 16, 16, 16)
    np.testing.assert_allclose(tile, 127.5)
