"""Synthetic land-use data for `make demo` when no DATA is given.

Three classes with a colour *and* a texture each, so a small CNN separates them after a few
epochs even under the trainer's colour augmentation: urban = red-grey blocks, vegetation =
green speckle, water = smooth blue waves. The same painter makes the training chips and
the GeoTIFF scene (quadrants), so the demo's map can be checked by eye.

    python demo/synthetic.py chips OUT_DIR      # ImageFolder: OUT_DIR/<class>/*.png
    python demo/synthetic.py scene OUT.tif      # 512x512 uint8 RGB, EPSG:32633, 10 m pixels
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

COLOURS = {"urban": (190, 90, 80), "vegetation": (60, 150, 60), "water": (40, 70, 170)}


def paint(name: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """[h,w,3] float image of one class."""
    base = np.asarray(COLOURS[name], np.float32)
    rows, cols = np.mgrid[0:h, 0:w].astype(np.float32)
    if name == "urban":
        blocks = rng.uniform(0.4, 1.4, (h // 8 + 1, w // 8 + 1))
        shade = np.kron(blocks, np.ones((8, 8)))[:h, :w]
    elif name == "vegetation":
        shade = rng.uniform(0.6, 1.3, (h, w))
    else:
        phase = rng.uniform(0, 2 * np.pi)
        shade = 1.0 + 0.15 * np.sin(rows / 5.0 + cols / 9.0 + phase)
    img = base[None, None, :] * shade[..., None] + rng.normal(0, 6, (h, w, 3))
    return np.clip(img, 0, 255)


def chips(out: Path, per_class: int = 40, size: int = 64) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in COLOURS:
        (out / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = paint(name, size, size, rng).astype(np.uint8)
            Image.fromarray(img).save(out / name / f"{i:03d}.png")


def scene(path: Path, size: int = 512) -> None:
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(1)
    half = size // 2
    img = np.zeros((size, size, 3), np.float32)
    img[:half, :half] = paint("urban", half, half, rng)
    img[:half, half:] = paint("vegetation", half, size - half, rng)
    img[half:, :] = paint("water", size - half, size, rng)
    profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
               "crs": "EPSG:32633", "transform": from_origin(500000, 5000000, 10, 10),
               "tiled": True, "blockxsize": 256, "blockysize": 256}
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(img.astype(np.uint8).transpose(2, 0, 1))


if __name__ == "__main__":
    what, target = sys.argv[1], Path(sys.argv[2])
    {"chips": chips, "scene": scene}[what](target)
