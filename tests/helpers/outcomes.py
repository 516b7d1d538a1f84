"""Synthetic scene outcomes for index and retrieval tests (no model, no raster)."""

from __future__ import annotations

import numpy as np

from appliance.contract.payloads import (
    Acquired,
    BandUse,
    ModelRef,
    RescaleUse,
    Resolution,
    SceneInput,
)
from appliance.scene.cells import SceneCells
from appliance.scene.pipeline import SceneOutcome

CLASSES = ["urban", "vegetation", "water"]
DIM = 8
SELF_SCORE_TOL = 1e-3
"""How far a stored vector's score against its own float32 original may be from 1: the
entry log keeps vectors as float16 (a relative error of about 5e-4 per component)."""


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    """``n`` random unit vectors."""
    v = rng.normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def outcome(scene_id: str, seed: int, n: int = 12, invalid: tuple[int, ...] = (),
            dim: int = DIM) -> SceneOutcome:
    """A SceneOutcome with synthetic cells on a 4-wide grid of 16 px cells."""
    rng = np.random.default_rng(seed)
    cols, rows = np.arange(n) % 4 * 16, np.arange(n) // 4 * 16
    windows = np.stack([cols, rows, np.full(n, 16), np.full(n, 16)], 1).astype(np.int64)
    x0, y1 = 500_000.0, 5_000_000.0
    lon0, lat1 = 10.0, 45.0
    wgs = np.stack([lon0 + cols * 1e-4, lat1 - (rows + 16) * 1e-4, lon0 + (cols + 16) * 1e-4,
                    lat1 - rows * 1e-4], 1)
    probs = np.zeros((n, 3), np.float32)
    probs[np.arange(n), np.arange(n) % 3] = 0.9
    probs[probs == 0] = 0.05
    valid = np.ones(n, bool)
    valid[list(invalid)] = False
    cells = SceneCells(scene_id=scene_id, crs="EPSG:32633", windows=windows,
                       transform=(10.0, 0.0, x0, 0.0, -10.0, y1),
                       bounds_wgs84=wgs, probs=probs, valid=valid, embeddings=unit(rng, n, dim),
                       sample_index=np.zeros(0, np.int64),
                       sample_features=np.zeros((0, 2, dim), np.float32),
                       band_sample=np.zeros((0, 3), np.float32))
    return SceneOutcome(scene_id=scene_id, source=f"{scene_id}.tif", crs="EPSG:32633",
                        bounds=(0, 0, 1, 1), bounds_wgs84=(0, 0, 1, 1), width=64, height=48,
                        fractions={}, areas_ha={}, mean_confidence=0.9, outputs={}, timings={},
                        tiles=n, cells=cells, model=ModelRef(name="synthetic", version=1),
                        input=SYNTHETIC_INPUT,
                        acquired=Acquired(datetime="2026-01-01T00:00:00Z", source="processing"),
                        warnings=[])


SYNTHETIC_INPUT = SceneInput(
    bands=[BandUse(band=b, index=i, label=b) for i, b in enumerate(["red", "green", "blue"], 1)],
    band_selection="metadata", rescale=RescaleUse(mode="none", gain=[1.0] * 3, bias=[0.0] * 3),
    resolution=Resolution(scene_gsd=10.0, bundle_gsd=None, matched=False, ratio=None,
                          windows=[16, 32], cell=16))
