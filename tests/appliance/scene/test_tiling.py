"""The multi-scale cell grid: windows, co-centring, validity, batches and read-ahead."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from rasterio.transform import from_origin

from appliance.config import InputConfig
from appliance.scene.raster import SceneError, open_scene
from appliance.scene.tiling import Batch, CellGrid, iter_batches, read_ahead
from tests.helpers.scenes import SPEC, write_scene


def test_grid_tiles_the_scene_exactly_with_no_partial_cells() -> None:
    grid = CellGrid(width=100, height=70, cell=32, scales=(32, 64))
    assert (grid.rows, grid.cols, len(grid)) == (2, 3, 6)
    w = grid.windows()
    assert w[:3, 0].tolist() == [0, 33, 67] and w[:3, 2].tolist() == [33, 34, 33]
    assert w[-1].tolist() == [67, 35, 33, 35]
    assert int((w[:, 2] * w[:, 3]).sum()) == 100 * 70  # no overhang, no sliver


def test_scale_windows_are_co_centred_inside_and_kept_in_the_scene_at_edges() -> None:
    grid = CellGrid(width=500, height=500, cell=56, scales=(56, 112, 224))
    for index in (40, 50):  # interior cells: one centre for every scale
        centres = {(c + s / 2, r + s / 2) for s in grid.scales for c, r in [grid.origin(index, s)]}
        assert len(centres) == 1
    for s in grid.scales:  # every window fits inside the scene, edge cells included
        cols, rows = grid.origins(s)
        assert cols.min() >= 0 and rows.min() >= 0
        assert (cols + s).max() <= 500 and (rows + s).max() <= 500
    win = grid.windows()
    c, r = grid.origin(len(grid) - 1, 224)  # the corner cell still lies in its window
    assert c <= win[-1, 0] and win[-1, 0] + win[-1, 2] <= c + 224
    assert r <= win[-1, 1] and win[-1, 1] + win[-1, 3] <= r + 224
    cols, rows = grid.origins(224)
    assert (cols[7], rows[7]) == grid.origin(7, 224)


def test_map_transform_covers_exactly_the_scene() -> None:
    grid = CellGrid(width=100, height=90, cell=16, scales=(16,))
    scene = from_origin(500000, 5000000, 10, 10)
    t = grid.map_transform(scene)
    assert (t.c, t.f) == (500000, 5000000)
    assert t @ (grid.cols, grid.rows) == pytest.approx(scene @ (100, 90))


def test_validity_marks_nodata_border_and_outside(tmp_path: Path) -> None:
    path = write_scene(tmp_path / "s.tif", size=(128, 128), nodata=0, border=16)
    grid = CellGrid(width=128, height=128, cell=16, scales=(16, 32))
    with open_scene(path, InputConfig(), SPEC) as scene:
        valid = grid.valid(scene, 0.5).reshape(8, 8)
    assert not valid[0].any() and not valid[-1].any() and not valid[:, 0].any()
    assert valid[1:-1, 1:-1].all()


def test_edge_windows_stay_inside_so_edge_cells_are_valid(tmp_path: Path) -> None:
    path = write_scene(tmp_path / "s.tif", size=(40, 40))
    grid = CellGrid(width=40, height=40, cell=16, scales=(16,))
    with open_scene(path, InputConfig(), SPEC) as scene:
        assert grid.valid(scene, 0.0).all()


def test_validity_counts_outside_the_scene_as_nodata(tmp_path: Path) -> None:
    path = write_scene(tmp_path / "s.tif", size=(24, 24))  # smaller than the 32 px window
    grid = CellGrid(width=24, height=24, cell=32, scales=(32,))
    with open_scene(path, InputConfig(), SPEC) as scene:
        assert grid.valid(scene, 0.5).all()  # 24² of 32²: 44 % outside
        assert not grid.valid(scene, 0.4).any()


def test_batches_hold_whole_cells_at_every_scale(tmp_path: Path) -> None:
    path = write_scene(tmp_path / "s.tif", size=(64, 64))
    grid = CellGrid(width=64, height=64, cell=16, scales=(16, 32))
    with open_scene(path, InputConfig(), SPEC) as scene:
        batches = list(iter_batches(scene, grid, np.arange(16), size=32, batch_size=10))
    assert [len(b.cells) for b in batches] == [5, 5, 5, 1]
    assert batches[0].tiles.shape == (10, 3, 32, 32)
    assert np.concatenate([b.cells for b in batches]).tolist() == list(range(16))


def _numbered(n: int) -> Iterator[Batch]:
    for i in range(n):
        yield Batch(np.array([i]), np.zeros((1, 1, 1, 1), np.float32), 0.0)


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_read_ahead_keeps_order(depth: int) -> None:
    got = [int(b.cells[0]) for b in read_ahead(_numbered(20), depth)]
    assert got == list(range(20))


def test_read_ahead_reraises_reader_errors() -> None:
    def failing() -> Iterator[Batch]:
        yield from _numbered(2)
        raise SceneError("unreadable", "block read failed")

    seen = []
    with pytest.raises(SceneError, match="block read failed"):
        for b in read_ahead(failing(), 2):
            seen.append(int(b.cells[0]))
    assert seen == [0, 1]


def test_read_ahead_stops_reader_when_consumer_stops() -> None:
    produced = []

    def counting() -> Iterator[Batch]:
        for b in _numbered(1000):
            produced.append(1)
            yield b

    gen = read_ahead(counting(), 2)
    next(gen)
    gen.close()  # joins the reader thread
    assert len(produced) < 10


def test_strip_tiles_equal_window_reads(tmp_path: Path) -> None:
    path = write_scene(tmp_path / "s.tif", size=(80, 64), noise=40)
    grid = CellGrid(width=64, height=80, cell=16, scales=(16, 32, 64))
    cells = np.array([0, 3, 6, 9, 13, 16, 19])
    with open_scene(path, InputConfig(), SPEC) as scene:
        batches = list(iter_batches(scene, grid, cells, size=32, batch_size=9))
        tiles = np.concatenate([b.tiles for b in batches])
        for i, cell in enumerate(cells):
            for j, s in enumerate(grid.scales):
                want = scene.read_window(*grid.origin(int(cell), s), s, s, 32, 32)
                got = tiles[i * 3 + j]
                # interiors agree; a strip's resampling kernel may see past a window's edge
                np.testing.assert_allclose(got[:, 2:-2, 2:-2], want[:, 2:-2, 2:-2], atol=0.5)


def test_validity_with_cells_larger_than_the_smallest_window(tmp_path: Path) -> None:
    # a 16 px window in a 142 px cell: a mask sampled per cell/4 would miss it entirely
    path = write_scene(tmp_path / "s.tif", size=(568, 568), nodata=0, border=142)
    grid = CellGrid(width=568, height=568, cell=142, scales=(16, 32))
    with open_scene(path, InputConfig(), SPEC) as scene:
        valid = grid.valid(scene, 0.5).reshape(4, 4)
    inner = np.zeros((4, 4), bool)
    inner[1:3, 1:3] = True
    np.testing.assert_array_equal(valid, inner)


@pytest.mark.parametrize("nodata", [None, 0], ids=["no-mask", "nodata-value"])
def test_the_last_column_is_classified_when_the_scene_is_not_a_multiple_of_the_cell(
    tmp_path: Path, nodata: int | None
) -> None:
    # 968 px, cell 56: 17 cells of 56.9 px; the old grid left a 16 px column unclassified
    path = write_scene(tmp_path / "s.tif", size=(56, 968), nodata=nodata)
    grid = CellGrid(width=968, height=56, cell=56, scales=(56, 112))
    with open_scene(path, InputConfig(), SPEC) as scene:
        assert grid.valid(scene, 0.0).tolist() == [True] * 17
    w = grid.windows()
    assert w[-1, 0] + w[-1, 2] == 968


def test_scales_smaller_than_the_cell_are_read_per_window(tmp_path: Path) -> None:
    path = write_scene(tmp_path / "s.tif", size=(96, 96), noise=40)
    grid = CellGrid(width=96, height=96, cell=32, scales=(16, 32))  # 16 px windows leave gaps
    cells = np.arange(9)
    with open_scene(path, InputConfig(), SPEC) as scene:
        tiles = np.concatenate([b.tiles for b in iter_batches(scene, grid, cells, 32, 8)])
        for cell in cells:
            want = scene.read_window(*grid.origin(int(cell), 16), 16, 16, 32, 32)
            np.testing.assert_array_equal(tiles[2 * cell], want)
