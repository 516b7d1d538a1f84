"""The one chip reader: every suffix, band choice and order, read-time resizing, grey
pictures, and errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import from_origin

from appliance.contract.chips import ChipError, read_chip
from appliance.contract.raster_open import DEFAULT_DRIVERS
from tests.helpers.chips import ALL_SUFFIXES, write_chip
from tests.helpers.hostile import Canary, vrt_xml, wms_xml, write_sparse


def write_bands(path: Path, data: np.ndarray, names: tuple[str | None, ...]) -> Path:
    """A GeoTIFF chip of ``data`` [C,H,W] with band descriptions ``names``."""
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1],
                       count=data.shape[0], dtype=data.dtype, crs="EPSG:32633",
                       transform=from_origin(500000, 4000000, 1, 1)) as dst:
        dst.write(data)
        for i, name in enumerate(names, 1):
            if name is not None:
                dst.set_band_description(i, name)
    return path


@pytest.mark.parametrize("suffix", ALL_SUFFIXES)
def test_every_suffix_reads_as_rgb_in_its_own_dtype(suffix: str, tmp_path: Path) -> None:
    chip = read_chip(write_chip(tmp_path / f"chip{suffix}", (30, 30, 200)))
    assert chip.data.shape == (3, 40, 40) and chip.data.dtype == np.uint8
    assert np.abs(chip.data.reshape(3, -1).mean(axis=1) - [30, 30, 200]).max() < 8  # JPEG
    assert len(chip.bands) == 3


def test_geotiff_bands_are_chosen_in_order_with_their_names(tmp_path: Path) -> None:
    data = np.stack([np.full((6, 8), 100 * b, np.uint16) for b in range(1, 5)])
    path = write_bands(tmp_path / "c.tif", data, ("nir", None, "red", "green"))
    every = read_chip(path)
    assert every.data.dtype == np.uint16 and every.data.shape == (4, 6, 8)
    assert every.bands == ["nir", "b2", "red", "green"]
    picked = read_chip(path, bands=[3, 1])
    assert picked.bands == ["red", "nir"]
    assert picked.data[:, 0, 0].tolist() == [300, 100]


def test_size_resamples_while_reading(tmp_path: Path) -> None:
    ramp = np.tile(np.arange(64, dtype=np.uint8) * 4, (3, 64, 1))
    tif = read_chip(write_bands(tmp_path / "r.tif", ramp, (None,) * 3), size=16)
    Image.fromarray(ramp.transpose(1, 2, 0)).save(tmp_path / "r.png")
    png = read_chip(tmp_path / "r.png", size=16)
    for chip in (tif, png):
        assert chip.data.shape == (3, 16, 16) and chip.data.dtype == np.uint8
        row = chip.data[0, 8].astype(int)
        assert (np.diff(row) > 0).all() and row[0] < 20 and row[-1] > 230


def test_one_band_of_a_picture_is_its_grey(tmp_path: Path) -> None:
    path = write_chip(tmp_path / "g.png", (200, 100, 50))
    grey = read_chip(path, bands=[1])
    assert grey.bands == ["grey"] and grey.data.shape == (1, 40, 40)
    assert int(grey.data[0, 0, 0]) == round(0.299 * 200 + 0.587 * 100 + 0.114 * 50)
    assert read_chip(path, bands=[3, 2, 1]).data[:, 0, 0].tolist() == [200, 100, 50]


def test_errors_name_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(ChipError, match=r"broken\.png: unreadable image"):
        read_chip(broken)
    truncated = tmp_path / "cut.tif"
    truncated.write_bytes(b"II*\x00" + b"\x00" * 20)
    with pytest.raises(ChipError, match=r"cut\.tif: unreadable image"):
        read_chip(truncated)
    tif = write_chip(tmp_path / "c.tif", (1, 2, 3))
    with pytest.raises(ChipError, match=r"c\.tif: has 3 band\(s\), cannot read bands \[4\]"):
        read_chip(tif, bands=[4])
    with pytest.raises(ChipError, match="use a GeoTIFF chip"):
        read_chip(write_chip(tmp_path / "p.jpg", (1, 2, 3)), bands=[1, 2, 3, 4])


def test_reference_chips_are_refused_without_a_request(tmp_path: Path) -> None:
    with Canary() as canary:
        vrt = tmp_path / "vrt.tif"  # VRT XML named like a GeoTIFF
        vrt.write_text(vrt_xml([f"/vsicurl/{canary.url}/x.tif"] * 3))
        wms = tmp_path / "wms.tiff"
        wms.write_text(wms_xml(canary.url))
        for path in (vrt, wms):
            for drivers in (DEFAULT_DRIVERS, ("GTiff", "VRT")):
                with pytest.raises(ChipError, match=r"refused \(format\)"):
                    read_chip(path, size=8, drivers=drivers)
        assert canary.requests == []


def test_pictures_are_only_png_or_jpeg(tmp_path: Path) -> None:
    bmp = tmp_path / "chip.png"  # a BMP named .png: Pillow may only use its PNG/JPEG decoders
    Image.new("RGB", (8, 8), (1, 2, 3)).save(bmp, format="BMP")
    with pytest.raises(ChipError, match=r"chip\.png: unreadable image"):
        read_chip(bmp)
    jpeg_as_png = write_chip(tmp_path / "j.jpg", (200, 10, 10)).rename(tmp_path / "j.png")
    assert read_chip(jpeg_as_png).data.shape == (3, 40, 40)


@pytest.mark.parametrize("suffix", ALL_SUFFIXES)
def test_max_pixels_refuses_before_decoding(suffix: str, tmp_path: Path) -> None:
    chip = write_chip(tmp_path / f"c{suffix}", (1, 2, 3), size=40)
    with pytest.raises(ChipError, match=r"refused \(too-large\).*max_pixels"):
        read_chip(chip, size=8, max_pixels=40 * 40 - 1)
    assert read_chip(chip, size=8, max_pixels=40 * 40).data.shape == (3, 8, 8)


def test_a_sparse_huge_geotiff_chip_is_too_large(tmp_path: Path) -> None:
    chip = write_sparse(tmp_path / "huge.tif", 200_000)
    with pytest.raises(ChipError, match=r"too-large"):
        read_chip(chip, size=8, max_pixels=10**9)
