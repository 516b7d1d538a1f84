"""Synthetic ``SceneCells`` streams for the colour bundle: clean or under a colour cast.

Each cell is a noisy tile of one pure class colour (urban=red, vegetation=green,
water=blue), classes balanced per scene, run through the real ``ModelRuntime`` at both
bundle scales (routed to the bundle's expert like the pipeline does), so drift and
adaptation see exactly what the pipeline would hand them.
"""

from __future__ import annotations

import numpy as np

from appliance.contract.signature import scene_signature
from appliance.model.routing import route
from appliance.model.runtime import ModelRuntime
from appliance.scene.cells import SceneCells
from tests.helpers.colour_bundle import INPUT_SIZE, PURE

BLUE_CAST = (-60.0, -20.0, 110.0)


def colour_scene(runtime: ModelRuntime, seed: int, cast: tuple[float, float, float] = (0, 0, 0),
                 n_cells: int = 30) -> tuple[SceneCells, np.ndarray]:
    """One scene's cells and their true classes; ``cast`` is added to every pixel."""
    rng = np.random.default_rng(seed)
    colours = np.asarray(list(PURE.values()), np.float32)
    truth = rng.permutation(np.arange(n_cells) % len(colours))
    base = colours[truth] + rng.normal(0, 15, (n_cells, 3))
    noise = rng.normal(0, 10, (n_cells, 3, INPUT_SIZE, INPUT_SIZE))
    shift = np.asarray(cast, np.float32)[None, :, None, None]
    tiles = np.clip(base[:, :, None, None] + noise + shift, 0, 255).astype(np.float32)
    pixels = tiles.transpose(0, 2, 3, 1).reshape(-1, 3)
    sample = pixels[rng.choice(len(pixels), 2000, replace=False)]
    domain = route(runtime.bundle, scene_signature(sample))  # as the pipeline does
    out = runtime.infer(tiles, domain)
    cells = SceneCells(
        scene_id=f"scene-{seed}", crs="EPSG:32633",
        windows=np.zeros((n_cells, 4), np.int64), transform=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0),
        bounds_wgs84=np.zeros((n_cells, 4)), probs=out.probs, valid=np.ones(n_cells, bool),
        embeddings=out.embedding, sample_index=np.arange(n_cells),
        sample_features=np.stack([out.features, out.features], axis=1), band_sample=sample,
        domain=domain,
        sample_tiles=np.stack([tiles[:4], tiles[:4]], axis=1).astype(np.float16),
    )
    return cells, truth
