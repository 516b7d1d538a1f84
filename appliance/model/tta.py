"""Test-time augmentation: class probabilities averaged over a tile's flips and quarter turns.

Overhead imagery has no up or down, so the eight symmetries of the square (four quarter
turns, each plain and mirrored: the dihedral group D4) are all equally valid views of a
tile. Averaging the classifier's probabilities over them removes part of the network's
orientation bias (AID test OA +0.003 to +0.006, `benchmarks/export_aid.py`) at
eight backbone passes per tile. A bundle opts in at export (``Manifest.tta``) and a box
that needs the speed turns it off (``model.tta: off``).

Only the probabilities are averaged: pooled features and the retrieval embedding stay
those of the tile as it is, so the drift reference, the source bank, the similarity index
and adaptation (all built from plain-view features) mean the same with TTA on or off.
"""

from __future__ import annotations

import numpy as np

from appliance.config import BoxTta
from appliance.contract.bundle import BundleTta

D4_VIEWS = 8


def view_count(bundle_tta: BundleTta, box_tta: BoxTta) -> int:
    """How many views of each tile are run: 8 when the bundle asks for TTA and the box
    follows it, else 1."""
    return D4_VIEWS if bundle_tta == "flips-rot90" and box_tta == "bundle" else 1


def d4_views(tiles: np.ndarray) -> np.ndarray:
    """[N,C,S,S] tiles → [8N,C,S,S]: the tiles as they are first (rows 0..N-1), then turned
    by 90°, 180°, 270°, then the same four of the tiles mirrored left-right; view-major, so
    ``mean_over_views`` can fold them back."""
    if tiles.ndim != 4 or tiles.shape[-1] != tiles.shape[-2]:
        raise ValueError(f"expected square [N,C,S,S] tiles, got shape {tiles.shape}")
    mirrored = tiles[..., ::-1]
    views = [np.rot90(t, k, axes=(-2, -1)) for t in (tiles, mirrored) for k in range(4)]
    return np.ascontiguousarray(np.concatenate(views))


def mean_over_views(values: np.ndarray, views: int) -> np.ndarray:
    """[V·N,…] rows in view-major order → [N,…] mean over the V views of each tile."""
    if len(values) % views:
        raise ValueError(f"{len(values)} rows are not {views} views of the same tiles")
    return values.reshape(views, len(values) // views, *values.shape[1:]).mean(axis=0)
