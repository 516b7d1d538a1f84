"""Image chips for tests: flat-coloured chips of every suffix, multi-band GeoTIFF folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio
from PIL import Image
from rasterio.transform import from_origin

from appliance.contract.image_files import IMAGE_SUFFIXES, is_raster


def write_geotiff_chips(root: Path, per_class: int = 6, bands: int = 4, size: int = 24) -> Path:
    """An ImageFolder of uint8 GeoTIFF chips with ``bands`` bands, class = brightest band."""
    rng = np.random.default_rng(1)
    for k, name in enumerate(["bright", "dark", "mid"]):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            chip = rng.integers(0, 60, size=(bands, size, size)) + 60 * k
            with rasterio.open(folder / f"{i}.tif", "w", driver="GTiff", width=size,
                               height=size, count=bands, dtype="uint8", crs="EPSG:32633",
                               transform=from_origin(500000, 4000000, 1, 1)) as dst:
                dst.write(chip.astype(np.uint8))
                dst.descriptions = tuple(f"band{j}" for j in range(bands))
    return root


ALL_SUFFIXES = sorted(IMAGE_SUFFIXES | {s.upper() for s in IMAGE_SUFFIXES})


def write_chip(path: Path, colour: tuple[int, int, int], size: int = 40) -> Path:
    """A flat-coloured 3-band uint8 chip: GeoTIFF via rasterio, otherwise Pillow."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_raster(path):
        data = np.broadcast_to(np.asarray(colour, np.uint8)[:, None, None], (3, size, size))
        with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=3,
                           dtype="uint8", crs="EPSG:32633",
                           transform=from_origin(500000, 4000000, 1, 1)) as dst:
            dst.write(data)
    else:
        Image.new("RGB", (size, size), colour).save(path)
    return path
