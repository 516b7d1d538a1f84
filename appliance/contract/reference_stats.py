"""Statistics shared by the exporter (writing ``reference.json``) and drift detection (reading it).

One implementation of "max probability", "entropy", "PCA projection" and "a reference from
model-input chips", so that source and target numbers are always computed the same way:
the exporter describes the source domain from its training chips, the adapter a new domain
from the tiles it stored, both through ``reference_from_tiles``.
"""

from __future__ import annotations

import numpy as np

from appliance.contract.bundle import (
    BandStats,
    ConfidenceStats,
    FeatureStats,
    Reference,
    SceneSample,
)
from appliance.contract.signature import scene_signature, sharpness

PCA_DIMS = 16
SAMPLE_ROWS = 512
REFERENCE_PIXELS = 200_000  # pixels sampled for a reference's band statistics
SAMPLE_SCENE_TILES = 12  # chips of one pseudo-scene: a small scene of 3x4 cells


def entropy(probs: np.ndarray) -> np.ndarray:
    """Shannon entropy (nats) of each probability row, normalised by log(K) into [0, 1]."""
    p = np.clip(probs, 1e-12, 1.0)
    p = p / p.sum(axis=1, keepdims=True)
    return (-(p * np.log(p)).sum(axis=1) / np.log(max(probs.shape[1], 2))).astype(np.float32)


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
    seed: int = 0,
    sharp: np.ndarray | None = None,
    scenes: list[SceneSample] | None = None,
) -> Reference:
    """The drift reference from source pixels [P,C], features [N,D], probs [N,K], the
    bands' sharpness on the source chips (``signature.sharpness``) and signatures of small
    scenes of the domain (``scene_samples``), if measured."""
    rng = np.random.default_rng(seed)
    mean = features.mean(axis=0)
    centred = features - mean
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    components = vt[: min(PCA_DIMS, vt.shape[0])]
    rows = rng.choice(len(features), size=min(SAMPLE_ROWS, len(features)), replace=False)
    projected = centred[rows] @ components.T
    return Reference(
        bands=band_stats(band_names, pixels, sharp),
        features=FeatureStats(
            mean=mean.tolist(), std=features.std(axis=0).tolist(),
            pca_components=components.tolist(), sample=projected.tolist(),
        ),
        confidence=ConfidenceStats(mean_max_prob=float(probs.max(axis=1).mean()),
                                   mean_entropy=float(entropy(probs).mean())),
        scenes=scenes or [],
    )


def scene_samples(tiles: np.ndarray, seed: int = 0) -> list[SceneSample]:
    """Signatures of pseudo-scenes of ``SAMPLE_SCENE_TILES`` model-input tiles [N,C,H,W]
    drawn at random, each signed as the box signs a scene (pixel moments and sharpness).

    A scene's signature moves with what it shows as well as with its sensor: a dozen chips of
    forest and a dozen of beach differ more than a mild haze moves either. These samples let
    the input step ask how many source scenes an expert's signature would take from the
    source model. A dozen chips is a small scene: larger ones stray less."""
    order = np.random.default_rng(seed).permutation(len(tiles))
    out = []
    for g in range(len(tiles) // SAMPLE_SCENE_TILES):
        part = tiles[order[g * SAMPLE_SCENE_TILES:(g + 1) * SAMPLE_SCENE_TILES]]
        mean, std, sharp = scene_signature(part.transpose(0, 2, 3, 1).reshape(-1, part.shape[1]),
                                           part)
        assert sharp is not None
        out.append(SceneSample(mean=[float(v) for v in mean], std=[float(v) for v in std],
                               sharpness=[float(v) for v in sharp]))
    return out


def reference_from_tiles(band_names: list[str], tiles: np.ndarray, features: np.ndarray,
                         probs: np.ndarray) -> Reference:
    """The reference of a domain from model-input tiles [N,C,H,W] (model value range), the
    features [N,D] and probabilities [N,K] the model computed on them: band statistics on
    at most ``REFERENCE_PIXELS`` of their pixels (a seeded sample), sharpness and scene
    samples on the tiles."""
    pixels = tiles.transpose(0, 2, 3, 1).reshape(-1, tiles.shape[1])
    pick = np.random.default_rng(0).choice(len(pixels), min(REFERENCE_PIXELS, len(pixels)),
                                           replace=False)
    return build_reference(band_names, pixels[pick], features, probs, sharp=sharpness(tiles),
                           scenes=scene_samples(tiles))
