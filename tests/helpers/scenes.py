"""Synthetic GeoTIFFs for tests: painted class regions, any band count, dtype, CRS, nodata.

Scenes are written in row strips (windowed writes), so even a large test scene never
exists whole in memory. Class colours are the colour bundle's pure colours
(tests/helpers/colour_bundle.py), so the colour classifier's predictions are known.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import rasterio
from rasterio.enums import ColorInterp
from rasterio.transform import Affine
from rasterio.windows import Window

from appliance.contract.bundle import InputSpec
from tests.helpers.colour_bundle import PURE

Layout = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""(rows [h,1], cols [1,w]) pixel indexes → [h,w] class names ("" = background)."""

GREY = (128, 128, 128)


def halves(height: int, width: int) -> Layout:
    """Left half urban (red), right half vegetation (green)."""
    del height
    return lambda r, c: np.where(c < width // 2, "urban", "vegetation")


def quarters(height: int, width: int) -> Layout:
    """Left half urban; right top vegetation; right bottom water."""
    def paint(r: np.ndarray, c: np.ndarray) -> np.ndarray:
        right = np.where(r < height // 2, "vegetation", "water")
        return np.where(c < width // 2, "urban", right)
    return paint


def default_transform(crs: str, size: tuple[int, int]) -> Affine:
    """10 m pixels in a UTM-like CRS; 0.0001° pixels near 45°N, 10°E in a geographic CRS."""
    if rasterio.crs.CRS.from_user_input(crs).is_geographic:
        return Affine(1e-4, 0.0, 10.0, 0.0, -1e-4, 45.0)
    return Affine(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0)


def write_scene(
    path: Path,
    *,
    bands: int = 3,
    dtype: str = "uint8",
    crs: str = "EPSG:32633",
    size: tuple[int, int] = (256, 256),
    nodata: float | None = None,
    layout: Layout | None = None,
    border: int = 0,
    band_order: tuple[int, ...] = (0, 1, 2),
    gain: float = 1.0,
    offset: float = 0.0,
    transform: Affine | None = None,
    tiled: bool = True,
    noise: float = 0.0,
    seed: int = 0,
    colorinterp: list[ColorInterp] | None = None,
    descriptions: list[str] | None = None,
    tags: dict[str, str] | None = None,
) -> Path:
    """Write a GeoTIFF of ``size`` (height, width) painted by ``layout``.

    Colour channel ``i`` (r, g, b) goes to band ``band_order[i]`` (0-based), other bands
    get mid-grey; values are ``colour * gain + offset`` cast to ``dtype``. A ``border`` of
    that many pixels is set to ``nodata`` (which must then be given). ``colorinterp``,
    ``descriptions`` and ``tags`` are written into the file as GDAL does (band metadata in
    the TIFF itself, no sidecar).
    """
    height, width = size
    layout = layout or halves(height, width)
    profile = {
        "driver": "GTiff", "width": width, "height": height, "count": bands, "dtype": dtype,
        "crs": crs, "transform": transform or default_transform(crs, size), "nodata": nodata,
    }
    if tiled and height >= 16 and width >= 16:
        profile |= {"tiled": True, "blockxsize": 256 if width >= 256 else 16,
                    "blockysize": 256 if height >= 256 else 16}
    palette = {name: np.asarray(rgb, np.float64) for name, rgb in PURE.items()}
    palette[""] = np.asarray(GREY, np.float64)
    rng = np.random.default_rng(seed)
    strip = 256
    with rasterio.open(path, "w", **profile) as dst:
        if colorinterp is not None:
            dst.colorinterp = colorinterp
        for i, text in enumerate(descriptions or [], 1):
            dst.set_band_description(i, text)
        if tags:
            dst.update_tags(**tags)
        for row0 in range(0, height, strip):
            h = min(strip, height - row0)
            rows = np.arange(row0, row0 + h)[:, None]
            cols = np.arange(width)[None, :]
            names = np.broadcast_to(np.asarray(layout(rows, cols)), (h, width))
            rgb = np.zeros((3, h, width))
            for name, colour in palette.items():
                rgb[:, names == name] = colour[:, None]
            data = np.full((bands, h, width), 128.0)
            for i, band in enumerate(band_order[:3]):
                if band < bands:
                    data[band] = rgb[i]
            if noise:
                data += rng.normal(0, noise, data.shape)
            data = data * gain + offset
            if np.issubdtype(np.dtype(dtype), np.integer):
                info = np.iinfo(np.dtype(dtype))
                data = np.clip(np.round(data), info.min, info.max)
            if border:
                edge = (rows < border) | (rows >= height - border) | (cols < border) | (
                    cols >= width - border)
                data[:, np.broadcast_to(edge, (h, width))] = nodata
            dst.write(data.astype(dtype), window=Window(0, row0, width, h))
    return path


SPEC = InputSpec(bands=["red", "green", "blue"], value_range=(0, 255), mean=[127.5] * 3,
                 std=[127.5] * 3, size=32)
