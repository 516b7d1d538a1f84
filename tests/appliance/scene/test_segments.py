"""GID's hybrid map: segments take the majority class of their cells."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.scene.outputs import NODATA
from appliance.scene.segments import cell_labels_on, hybrid_map, segment


def _two_tone(h: int = 64, w: int = 64) -> np.ndarray:
    img = np.zeros((3, h, w), np.float32)
    img[0, :, : w // 2 + 5] = 200  # the boundary is NOT on a cell edge (cells of 16 px)
    img[1, :, w // 2 + 5 :] = 200
    return img


@pytest.mark.parametrize("method", ["felzenszwalb", "slic"])
def test_segments_follow_the_image_boundary(method: str) -> None:
    seg = segment(_two_tone(), np.ones((64, 64), bool), method, 16.0)
    left, right = set(seg[:, :37].ravel()), set(seg[:, 37:].ravel())
    assert not left & right


def test_invalid_pixels_get_no_segment() -> None:
    valid = np.ones((64, 64), bool)
    valid[:8] = False
    seg = segment(_two_tone(), valid, "felzenszwalb", 16.0)
    assert (seg[:8] == -1).all() and (seg[8:] >= 0).all()


def test_unknown_method() -> None:
    with pytest.raises(ValueError, match="unknown segmentation"):
        segment(_two_tone(), np.ones((64, 64), bool), "watershed", 1.0)


def test_hybrid_map_refines_cell_boundaries() -> None:
    seg = np.broadcast_to(np.arange(64) >= 37, (64, 64)).astype(np.int64)  # two segments
    cells = np.array([[0, 0, 1, 1]] * 4, np.uint8)  # the cell map puts the edge at x=32
    under = cell_labels_on((64, 64), cells)
    out = hybrid_map(seg, under, 2)
    assert (out[:, :37] == 0).all() and (out[:, 37:] == 1).all()  # edge moved to x=37


def test_segment_without_valid_cells_is_nodata() -> None:
    seg = np.array([[0, 0, 1, 1]])
    under = np.array([[1, 1, NODATA, NODATA]], np.uint8)
    assert hybrid_map(seg, under, 2).tolist() == [[1, 1, NODATA, NODATA]]


def test_cell_labels_cover_a_grid_that_is_not_a_multiple_of_the_overview() -> None:
    cells = np.arange(9, dtype=np.uint8).reshape(3, 3)  # 100 px scene, 33.3 px cells
    under = cell_labels_on((50, 50), cells)  # a 50 px overview
    assert under.shape == (50, 50)
    assert under[0, 0] == 0 and under[-1, -1] == 8 and under[25, 25] == 4
    assert sorted(np.unique(under).tolist()) == list(range(9))
