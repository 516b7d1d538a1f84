"""Candidate collection: the cloud screen, and cells stored under their expert's key."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import rasterio

from appliance.adapt.candidates import CandidateStore, expert_key
from appliance.adapt.collector import CandidateCollector, cloud_like
from appliance.config import Settings
from appliance.model.runtime import ModelRuntime
from appliance.model.store import ModelStore
from appliance.scene.pipeline import process_scene
from tests.helpers.adaptation import HEAD_ONLY
from tests.helpers.colour_scenes import colour_scene


def test_cloud_screen_flags_bright_alike_bands_only() -> None:
    means = np.array([[250.0, 248.0, 245.0],   # thick cloud
                      [225.0, 205.0, 160.0],   # bright sand: bands differ
                      [120.0, 118.0, 121.0],   # grey asphalt: not bright
                      [255.0, 255.0, 255.0]])  # saturated
    assert cloud_like(means, (0.0, 255.0), 0.8, 0.08).tolist() == [True, False, False, True]


def test_cells_are_stored_under_the_key_of_their_expert(store: ModelStore,
                                                        runtime: ModelRuntime,
                                                        tmp_path: Path) -> None:
    ring = CandidateStore(tmp_path / "cells", max_cells=1000)
    collector = CandidateCollector(ring, HEAD_ONLY)
    bundle = store.active()
    cells = colour_scene(runtime, 0)[0]
    assert collector.collect(cells, bundle) == len(cells.sample_index)
    assert ring.count(expert_key(bundle, None)) == len(cells.sample_index)
    assert collector.adapted_key(bundle) == expert_key(bundle, None)  # no expert yet
    assert collector.key(bundle, "elsewhere") == ""  # an expert the bundle does not have


def test_cloud_like_cells_are_never_candidates(store: ModelStore, runtime: ModelRuntime,
                                               tmp_path: Path) -> None:
    """A real GeoTIFF, half red ground, half white cloud, through the pipeline: only the
    ground cells are stored for pseudo-labelling."""
    path = tmp_path / "cloudy.tif"
    data = np.zeros((3, 128, 128), np.uint8)
    data[0, :, :64] = 200  # red ground on the left
    data[:, :, 64:] = 250  # cloud on the right
    with rasterio.open(path, "w", driver="GTiff", width=128, height=128, count=3,
                       dtype="uint8", crs="EPSG:32633",
                       transform=rasterio.transform.from_origin(500000, 5000000, 10, 10)
                       ) as dst:
        dst.write(data)
    settings = Settings.model_validate({"model": {"providers": ["cpu"]},
                                        "tiling": {"scales": [16, 32], "batch_size": 16}})
    cells = process_scene(path, "cd" * 32, tmp_path / "out", runtime, settings,
                          probe_sharpness=settings.adapt.enabled).cells
    assert cells.band_means is not None
    left = cells.windows[:, 0] + cells.windows[:, 2] <= 64
    right = cells.windows[:, 0] >= 64
    np.testing.assert_allclose(cells.band_means[right], 250.0, atol=3)  # edges resample
    collector = CandidateCollector(CandidateStore(tmp_path / "cells", 1000), HEAD_ONLY)
    stored = collector.collect(cells, store.active())
    sampled = cells.sample_index
    assert stored == int(left[sampled].sum()) + int((~left & ~right)[sampled].sum())
    assert 0 < stored < len(sampled)
