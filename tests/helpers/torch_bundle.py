"""A REAL torch-exported tiny bundle for end-to-end tests (needs the [export] extra).

``build_tiny_bundle(out)`` generates noisy colour chips of the classes urban / vegetation /
water, trains a random-init resnet18 for one epoch at 32 px with ``export.train`` and seals
it with ``export.bundler`` — the same code path as ``terratile-export train && bundle``.
Takes a few seconds on a CPU; call it from a session-scoped fixture.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers.colour_bundle import PURE


def write_colour_chips(root: Path, per_class: int = 12, size: int = 40, seed: int = 0,
                       classes: tuple[str, ...] = tuple(PURE),
                       cast: tuple[float, float, float] = (0, 0, 0)) -> Path:
    """An ImageFolder of noisy PNG chips, one folder per colour class, ``cast`` added to
    every pixel (another sensor's look); returns ``root``."""
    rng = np.random.default_rng(seed)
    for name in classes:
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        base = np.asarray(PURE[name], np.float32) + np.asarray(cast, np.float32)
        for i in range(per_class):
            chip = np.clip(base + rng.normal(0, 25, size=(size, size, 3)), 0, 255)
            Image.fromarray(chip.astype(np.uint8)).save(folder / f"{name}_{i:03d}.png")
    return root


def build_tiny_bundle(out: Path) -> Path:
    """Data in ``out/data``, run in ``out/run``, sealed bundle in ``out/bundle`` (returned)."""
    from rich.console import Console

    from export.bundler import BundleOptions, bundle
    from export.train import TrainConfig, train

    quiet = Console(quiet=True)
    data = write_colour_chips(out / "data")
    run = train(TrainConfig(data=data, backbone="resnet18", out=out / "run", epochs=1,
                            image_size=32, pretrained=False, batch_size=12, lr=3e-3,
                            embedding_dim=16), quiet)
    bundle(run, out / "bundle", BundleOptions(name="tiny-torch", scales=(16, 32)), quiet)
    return out / "bundle"
