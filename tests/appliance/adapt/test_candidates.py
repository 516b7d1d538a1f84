"""The candidate store: bounded rings of cells and tiles, keys per expert, signatures."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from appliance.adapt.candidates import CandidateStore


def test_candidate_store_is_bounded(tmp_path: Path) -> None:
    ring = CandidateStore(tmp_path, max_cells=100, max_tiles=20)
    pixels = np.array([[10.0, 20.0, 30.0], [30.0, 40.0, 50.0]])
    for i in range(8):
        tiles = np.full((4, 2, 3, 8, 8), i, np.float32)  # 4 cells x 2 scales: 8 tiles
        ring.add(f"s{i}", np.ones((30, 2, 4), np.float32) * i, np.full((30, 3), 1 / 3), pixels,
                 "old" if i < 6 else "new", tiles, np.array([0.2, 0.3, 0.4]))
    assert len(ring) <= 100
    loaded = ring.load()
    assert set(np.unique(loaded.scenes)) == {"s5", "s6", "s7"}
    assert loaded.features.shape == (90, 2, 4)
    assert ring.count("new") == 60 and set(np.unique(ring.load("new").scenes)) == {"s6", "s7"}
    mean, std, sharp = loaded.signature()
    np.testing.assert_allclose(mean, [20, 30, 40])
    np.testing.assert_allclose(std, [10, 10, 10])
    np.testing.assert_allclose(sharp, [0.2, 0.3, 0.4])  # type: ignore[arg-type]
    assert len(ring.load("new", features=False)) == 0 and len(loaded.bands) == 3
    # The tile ring keeps the newest scenes' tiles within max_tiles (20: two scenes of 8),
    # newest first.
    kept = ring.tiles(list(range(1, 9)), cap=100)
    assert kept is not None and kept.shape == (16, 3, 8, 8)
    assert kept[0, 0, 0, 0] == 7 and kept[-1, 0, 0, 0] == 6
    assert not list(tmp_path.glob(".tmp-*")) and not list(tmp_path.glob("tiles/.tmp-*"))
