"""What one processed scene hands to the index, drift and adaptation: its cells.

The pipeline streams a scene through the model and keeps only what is bounded: fused
probabilities and one embedding per cell, plus a capped random sample of per-scale
backbone features and of rescaled pixels. A 10980² scene therefore never holds all its
features in memory, and downstream consumers get one typed object.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from rasterio.transform import Affine

Affine6 = tuple[float, float, float, float, float, float]


def windows_bounds(windows: np.ndarray, transform: Sequence[float]) -> np.ndarray:
    """[n,4] ``minx, miny, maxx, maxy`` of each ``col, row, width, height`` window under
    the pixel -> CRS affine ``transform`` (its first six coefficients)."""
    col, row, w, h = (windows[:, i].astype(np.float64) for i in range(4))
    xs, ys = Affine(*transform[:6]) @ (np.stack([col, col + w]), np.stack([row, row + h]))
    xs, ys = np.asarray(xs), np.asarray(ys)
    return np.stack([xs.min(0), ys.min(0), xs.max(0), ys.max(0)], axis=1)


@dataclass(frozen=True)
class SceneCells:
    """Per-cell outputs of one scene, in the scene's pixel grid and CRS.

    Attributes:
        scene_id: sha256 of the scene file.
        crs: the scene CRS as a WKT or ``EPSG:n`` string.
        windows: [n,4] int64 ``col_off, row_off, width, height`` of each cell.
        transform: the scene's pixel -> CRS affine (a, b, c, d, e, f), which gives each
            cell its ``bounds`` in the scene CRS.
        bounds_wgs84: [n,4] float64 each cell's bounds in EPSG:4326 (lon/lat).
        probs: [n,K] float32 fused class probabilities (zeros where invalid).
        valid: [n] bool, False for cells that are mostly nodata.
        embeddings: [n,E] float32 L2-normalised embeddings at the retrieval scale.
        sample_index: [m] int64 indexes of the cells in the feature sample.
        sample_features: [m,S,D] float32 backbone features of sampled valid cells, per scale.
        band_sample: [p,C] float32 valid pixels after rescaling (model value range).
        domain: the bundle expert the scene was routed to (None: the source model); the
            features were computed under that expert's input spec.
        sample_tiles: [t,S,C,H,W] float16 model-input tiles (value range, every scale) of a
            few random valid cells, for layer re-normalisation; None when not sampled.
        sharpness: [C] the scene's sharpness (``routing.sharpness``) as routing measured it.
        band_means: [n,C] float32 mean of each cell's own window per band, rescaled (model
            value range; zeros where invalid): what the cloud screen reads.
    """

    scene_id: str
    crs: str
    windows: np.ndarray
    transform: Affine6
    bounds_wgs84: np.ndarray
    probs: np.ndarray
    valid: np.ndarray
    embeddings: np.ndarray
    sample_index: np.ndarray
    sample_features: np.ndarray
    band_sample: np.ndarray
    domain: str | None = None
    sample_tiles: np.ndarray | None = None
    sharpness: np.ndarray | None = None
    band_means: np.ndarray | None = None

    @property
    def bounds(self) -> np.ndarray:
        """[n,4] float64 ``minx, miny, maxx, maxy`` of each cell in the scene CRS."""
        return windows_bounds(self.windows, self.transform)

    @property
    def labels(self) -> np.ndarray:
        """Fused argmax per cell; -1 where the cell is nodata."""
        out = self.probs.argmax(axis=1).astype(np.int64)
        out[~self.valid] = -1
        return out

    @property
    def confidence(self) -> np.ndarray:
        """Fused max probability per cell; 0 where the cell is nodata."""
        out = self.probs.max(axis=1).astype(np.float32)
        out[~self.valid] = 0.0
        return out

    def __len__(self) -> int:
        return len(self.windows)
