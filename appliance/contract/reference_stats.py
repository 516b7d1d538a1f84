"""Statistics shared by the exporter (writing ``reference.json``) and drift detection (reading it).

One implementation of "max probability", "entropy", "PCA projection" and "distance to the
nearest centroid" so that source and target numbers are always computed the same way.
"""

from __future__ import annotations

import numpy as np

from appliance.contract.bundle import BandStats, ConfidenceStats, FeatureStats, Reference

PCA_DIMS = 16
SAMPLE_ROWS = 512
REFERENCE_PIXELS = 200_000  # pixels sampled for a reference's band statistics


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each probability row, normalised by log(K) into [0, 1]."""
    p = np.clip(probs, 1e-12, 1.0)
    p = p / p.sum(axis=1, keepdims=True)
    return (-(p * np.log(p)).sum(axis=1) / np.log(max(probs.shape[1], 2))).astype(np.float32)


def nearest_centroid_distance(features: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Euclidean distance from each feature row to its nearest class centroid."""
    d2 = (
        (features**2).sum(1, keepdims=True)
        - 2 * features @ centroids.T
        + (centroids**2).sum(1)[None, :]
    )
    return np.sqrt(np.maximum(d2.min(axis=1), 0.0)).astype(np.float32)


def band_stats(names: list[str], pixels: np.ndarray, sharp: np.ndarray | None = None
               ) -> list[BandStats]:
    """Per-band mean, std and 101 quantiles of [P,C] pixels in the model's value range, and
    the bands' sharpness on model-input chips if given."""
    qs = np.percentile(pixels, np.arange(101), axis=0)
    return [
        BandStats(name=name, mean=float(pixels[:, i].mean()), std=float(pixels[:, i].std()),
                  quantiles=[float(v) for v in qs[:, i]],
                  sharpness=None if sharp is None else float(sharp[i]))
        for i, name in enumerate(names)
    ]


def build_reference(
    band_names: list[str],
    pixels: np.ndarray,
    features: np.ndarray,
    probs: np.ndarray,
    centroids: np.ndarray,
    seed: int = 0,
    sharp: np.ndarray | None = None,
) -> Reference:
    """The drift reference from source pixels [P,C], features [N,D], probs [N,K], centroids
    and the bands' sharpness on the source chips (``routing.sharpness``), if measured."""
    rng = np.random.default_rng(seed)
    mean = features.mean(axis=0)
    centred = features - mean
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    components = vt[: min(PCA_DIMS, vt.shape[0])]
    rows = rng.choice(len(features), size=min(SAMPLE_ROWS, len(features)), replace=False)
    projected = centred[rows] @ components.T
    dist = nearest_centroid_distance(features, centroids)
    max_prob = probs.max(axis=1)
    ent = entropy(probs)
    return Reference(
        bands=band_stats(band_names, pixels, sharp),
        features=FeatureStats(
            mean=mean.tolist(), std=features.std(axis=0).tolist(), pca_mean=mean.tolist(),
            pca_components=components.tolist(), sample=projected.tolist(),
            centroid_distance_mean=float(dist.mean()), centroid_distance_std=float(dist.std()),
        ),
        confidence=ConfidenceStats(
            mean_max_prob=float(max_prob.mean()), std_max_prob=float(max_prob.std()),
            mean_entropy=float(ent.mean()), std_entropy=float(ent.std()),
        ),
    )


def class_centroids(features: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Mean feature per class ([K,D]); a class with no rows gets the global mean."""
    out = np.tile(features.mean(axis=0), (n_classes, 1)).astype(np.float32)
    for k in range(n_classes):
        rows = labels == k if labels.ndim == 1 else labels[:, k] > 0
        if rows.any():
            out[k] = features[rows].mean(axis=0)
    return out
