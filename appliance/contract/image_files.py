"""Which files are image chips, and which reader opens them: one list for the appliance
(``index add``, image queries) and the exporter (training data, int8 calibration).

GeoTIFF chips (any band count and dtype) are read with rasterio, JPEG and PNG with Pillow.
Both sides route on these suffixes (case-insensitive), so a file that one side accepts the
other can read too. The list stays this short on purpose: every suffix in it is opened by
the same reader everywhere, and tests cover each one.
"""

from __future__ import annotations

from pathlib import Path

RASTER_SUFFIXES = frozenset({".tif", ".tiff"})
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png"}) | RASTER_SUFFIXES


def is_image(path: Path) -> bool:
    """True for a file name that some chip reader opens (JPEG, PNG or GeoTIFF)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def is_raster(path: Path) -> bool:
    """True for a GeoTIFF chip: read with rasterio (band count and dtype kept), not Pillow."""
    return path.suffix.lower() in RASTER_SUFFIXES
