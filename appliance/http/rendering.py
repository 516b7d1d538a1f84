"""Pictures for the dashboard: a scene's land-use map as a web-map overlay, cell thumbnails.

The overlay is the scene's ``landuse`` map (cell resolution, scene CRS) reprojected to Web
Mercator, the projection of the browser's map, so that the picture stretched over its
corners lies exactly where the cells are; nodata is transparent. A thumbnail is one
cell's window read from the scene's input in ``processed/`` (a windowed read: the scene is
never read whole), its first three bands (or one, grey); 8-bit scenes as they are, others
stretched between the 2nd and 98th percentiles.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.warp import calculate_default_transform, reproject, transform
from rasterio.windows import Window

from appliance.contract.raster_open import SAFE_GDAL, open_raster

WEB_MERCATOR = CRS.from_epsg(3857)
WGS84 = CRS.from_epsg(4326)
NODATA = 255
THUMBNAIL_PX = 96


class OutsideScene(ValueError):
    """A thumbnail window that does not lie inside its scene."""


@dataclass(frozen=True)
class Overlay:
    """A transparent PNG and the lat/lon corners it covers ([[south, west], [north, east]])."""

    png: bytes
    bounds: tuple[tuple[float, float], tuple[float, float]]


def png_bytes(rgba: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(rgba).save(out, format="PNG", optimize=True)
    return out.getvalue()


def landuse_overlay(path: Path) -> Overlay:
    """The class map at ``path`` (a ``landuse.tif`` the node wrote) for a web map."""
    with rasterio.Env(**SAFE_GDAL), rasterio.open(path) as src:
        dst_transform, width, height = calculate_default_transform(
            src.crs, WEB_MERCATOR, src.width, src.height, *src.bounds)
        labels = np.full((height, width), NODATA, np.uint8)
        reproject(rasterio.band(src, 1), labels, src_nodata=NODATA, dst_nodata=NODATA,
                  dst_transform=dst_transform, dst_crs=WEB_MERCATOR,
                  resampling=Resampling.nearest)
        colours = src.colormap(1)
    lut = np.zeros((256, 4), np.uint8)
    for value, rgba in colours.items():
        lut[value] = (*rgba[:3], 255)
    lut[NODATA] = (0, 0, 0, 0)
    west, north = dst_transform * (0, 0)
    east, south = dst_transform * (width, height)
    lons, lats = transform(WEB_MERCATOR, WGS84, [west, east], [south, north])
    return Overlay(png_bytes(lut[labels]), ((lats[0], lons[0]), (lats[1], lons[1])))


def cell_thumbnail(path: Path, window: Sequence[int], drivers: Sequence[str],
                   max_pixels: int) -> bytes:
    """PNG of the window ``col_off, row_off, width, height`` of the scene at ``path``."""
    col, row, width, height = (int(v) for v in window)
    with rasterio.Env(**SAFE_GDAL), open_raster(path, drivers, max_pixels) as src:
        if col + width > src.width or row + height > src.height:
            raise OutsideScene(f"window {list(window)} is outside the {src.width}x"
                               f"{src.height} px scene")
        bands = [1, 2, 3] if src.count >= 3 else [1]
        scale = min(1.0, THUMBNAIL_PX / max(width, height))  # large cells read decimated
        shape = (len(bands), max(1, round(height * scale)), max(1, round(width * scale)))
        data = src.read(bands, window=Window(col, row, width, height), masked=True,
                        out_shape=shape, out_dtype="float64", resampling=Resampling.average)
        is_byte = src.dtypes[0] == "uint8"
    stretched = _for_display(data, is_byte)
    rgb = np.repeat(stretched, 3, axis=0) if len(bands) == 1 else stretched
    image = Image.fromarray(np.moveaxis(rgb, 0, -1))
    if max(image.size) < THUMBNAIL_PX:  # small cells are shown enlarged, pixels kept sharp
        scale = THUMBNAIL_PX / max(image.size)
        image = image.resize((max(1, round(image.width * scale)),
                              max(1, round(image.height * scale))), Image.Resampling.NEAREST)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _for_display(data: np.ma.MaskedArray, is_byte: bool) -> np.ndarray:
    """Bands as uint8: 8-bit scenes as they are, others stretched between the 2nd and 98th
    percentiles of all bands together (one stretch keeps the colours' balance)."""
    values = data.compressed()
    values = values[np.isfinite(values)]
    if is_byte or values.size == 0:
        return np.asarray(data.filled(0), np.float64).clip(0, 255).astype(np.uint8)
    lo, hi = np.percentile(values, [2, 98])
    scaled = (data.filled(lo) - lo) / (hi - lo if hi > lo else 1.0)
    return np.clip(np.nan_to_num(scaled) * 255, 0, 255).astype(np.uint8)
