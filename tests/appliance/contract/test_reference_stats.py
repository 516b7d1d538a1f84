"""A domain's reference from model-input tiles: band statistics and small-scene samples."""

from __future__ import annotations

import json

import numpy as np

from appliance.contract.bundle import Reference, upgrade_reference
from appliance.contract.reference_stats import (
    SAMPLE_SCENE_TILES,
    reference_from_tiles,
    scene_samples,
)
from appliance.contract.signature import scene_signature


def _tiles(n: int, seed: int = 0) -> np.ndarray:
    """``n`` flat-ish tiles of random brightness: content that moves a scene's signature."""
    rng = np.random.default_rng(seed)
    level = rng.uniform(40, 220, (n, 3, 1, 1))
    return (level + rng.normal(0, 10, (n, 3, 8, 8))).astype(np.float32)


def test_scene_samples_sign_random_dozens_as_the_box_signs_a_scene() -> None:
    tiles = _tiles(5 * SAMPLE_SCENE_TILES + 7)
    samples = scene_samples(tiles)
    assert len(samples) == 5  # the 7 left over make no scene
    order = np.random.default_rng(0).permutation(len(tiles))
    first = tiles[order[:SAMPLE_SCENE_TILES]]
    mean, std, sharp = scene_signature(first.transpose(0, 2, 3, 1).reshape(-1, 3), first)
    assert np.allclose(samples[0].mean, mean) and np.allclose(samples[0].std, std)
    assert sharp is not None and np.allclose(samples[0].sharpness, sharp)
    spread = np.ptp([s.mean[0] for s in samples])
    assert spread > 10  # content alone moves small scenes apart


def test_a_reference_carries_its_scene_samples_and_old_ones_load_without() -> None:
    tiles = _tiles(3 * SAMPLE_SCENE_TILES)
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(4), len(tiles)).astype(np.float32)
    ref = reference_from_tiles(["r", "g", "b"], tiles, rng.normal(size=(len(tiles), 6)), probs)
    assert len(ref.scenes) == 3
    again = Reference.model_validate(upgrade_reference(json.loads(ref.model_dump_json(
        by_alias=True))))
    assert again.scenes == ref.scenes
    raw = json.loads(ref.model_dump_json(by_alias=True))
    del raw["scenes"]  # a bundle exported before the samples existed
    assert Reference.model_validate(upgrade_reference(raw)).scenes == []
