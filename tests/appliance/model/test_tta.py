"""The eight test-time views of a tile: the symmetries of the square, folded back per tile."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.config import Settings
from appliance.model.tta import D4_VIEWS, d4_views, mean_over_views, view_count


def _tiles(n: int = 3, size: int = 5) -> np.ndarray:
    return np.random.default_rng(0).random((n, 2, size, size)).astype(np.float32)


def test_views_are_the_eight_distinct_symmetries_of_each_tile() -> None:
    tiles = _tiles()
    views = d4_views(tiles).reshape(D4_VIEWS, *tiles.shape)
    np.testing.assert_array_equal(views[0], tiles)  # the plain view comes first
    for i in range(len(tiles)):
        keys = {views[v, i].tobytes() for v in range(D4_VIEWS)}
        assert len(keys) == D4_VIEWS  # no symmetry missed or repeated
        # closed under a quarter turn and a mirror: the same set of eight images
        turned = {np.rot90(views[v, i], 1, axes=(-2, -1)).tobytes() for v in range(D4_VIEWS)}
        mirrored = {views[v, i][..., ::-1].tobytes() for v in range(D4_VIEWS)}
        assert turned == keys and mirrored == keys


def test_mean_over_views_folds_view_major_rows_back_per_tile() -> None:
    rows = np.arange(8 * 2 * 3, dtype=np.float64).reshape(8 * 2, 3)  # 8 views of 2 tiles
    expected = np.stack([rows[t::2].mean(axis=0) for t in range(2)])
    np.testing.assert_allclose(mean_over_views(rows, 8), expected)
    with pytest.raises(ValueError):
        mean_over_views(rows[:-1], 8)
    with pytest.raises(ValueError):
        d4_views(np.zeros((1, 3, 4, 5), np.float32))  # not square


def test_box_setting_turns_the_bundles_tta_off() -> None:
    assert view_count("flips-rot90", "bundle") == 8
    assert view_count("flips-rot90", "off") == 1
    assert view_count("none", "bundle") == 1
    assert Settings().model.tta == "bundle"
    assert Settings(model={"tta": "off"}).model.tta == "off"
    with pytest.raises(ValueError):
        Settings(model={"tta": "always"})
