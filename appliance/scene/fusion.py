"""Fusing per-scale class probabilities of a cell into one (GID's multi-scale fusion).

A small registry of rules, as a plain dict: ``mean`` (the seed paper's default), ``max``
(keeps the most confident scale's vote per class) and ``weighted`` (a weighted mean, one
weight per scale from ``tiling.weights``). Single-label results are renormalised to sum
to one; multi-label (sigmoid) probabilities are left per class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

Fuser = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _mean(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.asarray(probs.mean(axis=1))


def _max(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.asarray(probs.max(axis=1))


def _weighted(probs: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return np.asarray(np.einsum("nsk,s->nk", probs, weights / weights.sum()))


FUSERS: dict[str, Fuser] = {"mean": _mean, "max": _max, "weighted": _weighted}


def fuse(
    probs: np.ndarray,
    rule: str = "mean",
    weights: Sequence[float] | None = None,
    multi_label: bool = False,
) -> np.ndarray:
    """[n,S,K] per-scale probabilities → [n,K] fused probabilities (float32).

    Raises ``ValueError`` for an unknown rule or weights that do not match the scales.
    """
    if rule not in FUSERS:
        raise ValueError(f"unknown fusion rule {rule!r}; known: {sorted(FUSERS)}")
    n_scales = probs.shape[1]
    w = np.ones(n_scales) if weights is None else np.asarray(weights, np.float64)
    if w.shape != (n_scales,) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"need {n_scales} non-negative weights with a positive sum, got {weights}")
    out = FUSERS[rule](probs.astype(np.float64), w)
    if not multi_label:
        out = out / np.maximum(out.sum(axis=1, keepdims=True), 1e-12)
    return out.astype(np.float32)
