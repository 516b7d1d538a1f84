"""The one chip reader: an image file → its bands as a [C,H,W] array of the file's own dtype.

The workstation reads its training and calibration chips with it and the box its reference
images (``terratile index add``) and image queries, so both decode a file the same way:
GeoTIFF chips (``image_files.is_raster``) through rasterio, any band count and dtype; JPEG
and PNG through Pillow as RGB, or as one grey (luma) band when exactly one band is asked
for. Band numbers select GeoTIFF bands; a picture has none, so only how many are asked for
counts there.

Values are returned as stored. Mapping them into a model's value range is the caller's
choice: the workstation measures the range of its training chips, the box rescales a chip
by ``input.rescale`` as it does a scene. The box reads at its model's input size
(``size``): rasterio resamples while reading (bilinear; a large file is never read whole),
Pillow resizes bilinear. The workstation reads at the native size and resizes itself.
Every failure is a ``ChipError`` naming the file.

Chips arrive from outside (image queries), so they are opened like scenes
(``appliance.contract.raster_open``): GeoTIFFs by GDAL limited to ``drivers`` (default
GTiff/COG; a VRT only when listed, and only with in-tree GeoTIFF sources), with network
access off; pictures by Pillow limited to its PNG and JPEG decoders, whatever the suffix
says; and, with ``max_pixels``, a declared size above it refused before anything is decoded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from PIL import Image, UnidentifiedImageError
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError

from appliance.contract.image_files import is_raster
from appliance.contract.raster_open import (
    DEFAULT_DRIVERS,
    SAFE_GDAL,
    RasterRefused,
    check_local_file,
    check_size,
    open_raster,
)

PICTURE_FORMATS = ("PNG", "JPEG")  # the only Pillow decoders a chip may use

RGB_BANDS = ("red", "green", "blue")
GREY_BAND = "grey"


class ChipError(ValueError):
    """A chip that cannot be read as asked; the message starts with its path.

    ``reason`` is the slug a scene refused for the same cause would get: ``format``,
    ``too-large``, ``bands`` or ``unreadable``.
    """

    def __init__(self, message: str, reason: str = "unreadable") -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Chip:
    """One decoded chip: ``data`` [C,H,W] in the file's dtype, one name per band."""

    data: np.ndarray
    bands: list[str]


def read_chip(path: Path, bands: Sequence[int] | None = None, size: int | None = None, *,
              drivers: Sequence[str] = DEFAULT_DRIVERS, max_pixels: int | None = None) -> Chip:
    """Read ``path`` (JPEG, PNG or GeoTIFF), optionally resized to ``size`` x ``size``.

    ``bands``: 1-based GeoTIFF bands in the order wanted (default: all of them). For a
    JPEG/PNG only their number counts: three (or ``None``) read RGB, one reads grey.
    ``drivers``: the GDAL drivers a GeoTIFF-suffixed chip may be opened with;
    ``max_pixels``: the largest declared width x height accepted (None: no limit).
    """
    path = Path(path)
    try:
        if is_raster(path):
            return _read_raster(path, bands, size, drivers, max_pixels)
        return _read_picture(path, bands, size, max_pixels)
    except RasterRefused as exc:
        what = "unreadable image" if exc.reason == "unreadable" else f"refused ({exc.reason})"
        raise ChipError(f"{path}: {what}: {exc.message}", exc.reason) from exc
    except (OSError, UnidentifiedImageError, RasterioIOError, Image.DecompressionBombError
            ) as exc:
        raise ChipError(f"{path}: unreadable image: {exc}") from exc


def _read_raster(path: Path, bands: Sequence[int] | None, size: int | None,
                 drivers: Sequence[str], max_pixels: int | None) -> Chip:
    with rasterio.Env(**SAFE_GDAL), open_raster(path, drivers, max_pixels) as src:
        idx = list(bands) if bands is not None else list(range(1, src.count + 1))
        if not idx or min(idx) < 1 or max(idx) > src.count:
            raise ChipError(f"{path}: has {src.count} band(s), cannot read bands {idx}",
                            "bands")
        if size is None:
            data = src.read(idx)
        else:
            data = src.read(idx, out_shape=(len(idx), size, size),
                            resampling=Resampling.bilinear)
        names = [src.descriptions[i - 1] or f"b{i}" for i in idx]
    return Chip(data, names)


def _read_picture(path: Path, bands: Sequence[int] | None, size: int | None,
                  max_pixels: int | None) -> Chip:
    n = 3 if bands is None else len(bands)
    if n not in (1, 3):
        raise ChipError(f"{path}: a JPEG/PNG chip gives 3 bands (RGB) or 1 (grey), not {n}; "
                        "use a GeoTIFF chip", "bands")
    with Image.open(check_local_file(path), formats=PICTURE_FORMATS) as img:
        if max_pixels is not None:  # the header only: nothing is decoded yet
            check_size(path.name, img.width, img.height, max_pixels)
        pic = img.convert("L" if n == 1 else "RGB")
    if size is not None:
        pic = pic.resize((size, size), Image.Resampling.BILINEAR)
    data = np.asarray(pic).reshape(pic.height, pic.width, n).transpose(2, 0, 1)
    return Chip(np.ascontiguousarray(data), [GREY_BAND] if n == 1 else list(RGB_BANDS))
