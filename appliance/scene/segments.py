"""GID's hybrid map: image segments that each take the majority class of their cells.

Patch-wise classification gives one class per cell, with blocky boundaries. The seed
paper aggregates patch predictions over segments of the image so that the map follows
object boundaries. Here the segments come from scikit-image (Felzenszwalb or SLIC) on the
scene's overview (at most ``input.rescale.sample_size`` px a side, already read for the
statistics), so the hybrid map is finer than the cell map and never needs the full scene.

``tiling.segment_scale`` is Felzenszwalb's ``scale``; for SLIC it is the target segment
side in overview pixels (``n_segments = h * w / scale²``).
"""

from __future__ import annotations

import numpy as np
from skimage.segmentation import felzenszwalb, slic

from appliance.scene.outputs import NODATA


def segment(image: np.ndarray, valid: np.ndarray, method: str, scale: float) -> np.ndarray:
    """[C,h,w] image in any value range → [h,w] int64 segment ids (-1 where invalid)."""
    hwc = np.moveaxis(image, 0, -1).astype(np.float64)
    lo, hi = hwc.min(), hwc.max()
    hwc = (hwc - lo) / (hi - lo) if hi > lo else np.zeros_like(hwc)
    if method == "felzenszwalb":
        seg = felzenszwalb(hwc, scale=scale, sigma=0.8, min_size=max(4, int(scale // 4)),
                           channel_axis=-1)
    elif method == "slic":
        n = max(1, int(hwc.shape[0] * hwc.shape[1] / scale**2))
        seg = slic(hwc, n_segments=n, compactness=10.0, start_label=0, channel_axis=-1,
                   mask=valid)
    else:
        raise ValueError(f"unknown segmentation method {method!r}; use felzenszwalb or slic")
    seg = np.asarray(seg, np.int64)
    seg[~valid] = -1
    return seg


def cell_labels_on(shape: tuple[int, int], labels: np.ndarray) -> np.ndarray:
    """The cell map [rows,cols] (cells tiling the scene evenly) sampled at the centres of
    a [h,w] grid over the same scene."""
    h, w = shape
    rows = ((np.arange(h) + 0.5) * labels.shape[0] / h).astype(np.int64)
    cols = ((np.arange(w) + 0.5) * labels.shape[1] / w).astype(np.int64)
    return labels[np.ix_(rows, cols)]


def hybrid_map(segments: np.ndarray, cell_labels: np.ndarray, n_classes: int) -> np.ndarray:
    """[h,w] uint8: each segment's pixels take the majority valid cell class (255 if none)."""
    ok = (segments >= 0) & (cell_labels != NODATA)
    n_seg = int(segments.max()) + 1 if segments.size and segments.max() >= 0 else 0
    out = np.full(segments.shape, NODATA, np.uint8)
    if n_seg == 0 or not ok.any():
        return out
    votes = np.bincount(segments[ok] * n_classes + cell_labels[ok].astype(np.int64),
                        minlength=n_seg * n_classes).reshape(n_seg, n_classes)
    winner = np.where(votes.sum(1) > 0, votes.argmax(1), NODATA).astype(np.uint8)
    has_seg = segments >= 0
    out[has_seg] = winner[segments[has_seg]]
    return out
