"""The GID multi-scale grid: cells, co-centred windows at every scale, batches, read-ahead.

A scene is cut into cells of ``cell`` px (the last row and column may be partial). Around
each cell centre sits one square window per scale (e.g. 56, 112, 224 px of the scene),
each resized to the model input; windows reaching past the scene edge are padded (see
``raster.Scene.read_window``). A cell is *valid* when at most ``nodata_fraction`` of its
window at the smallest scale is nodata or outside the scene; invalid cells are never
sent to the model.

Reading runs in a thread that fills a bounded queue of ``read_ahead`` batches while the
caller runs inference (onnxruntime and GDAL both release the GIL), so memory stays at a
few batches whatever the scene size.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Generator, Iterator
from dataclasses import dataclass

import numpy as np
from rasterio.transform import Affine

from appliance.scene.raster import Scene

MASK_SAMPLES_PER_WINDOW = 4  # validity is sampled 4x4 times per smallest window at least


@dataclass(frozen=True)
class CellGrid:
    """Cells of ``cell`` px over a ``width`` x ``height`` scene, and their scale windows."""

    width: int
    height: int
    cell: int
    scales: tuple[int, ...]

    @property
    def rows(self) -> int:
        return math.ceil(self.height / self.cell)

    @property
    def cols(self) -> int:
        return math.ceil(self.width / self.cell)

    def __len__(self) -> int:
        return self.rows * self.cols

    def windows(self) -> np.ndarray:
        """[n,4] ``col_off, row_off, width, height`` of every cell, clipped to the scene."""
        r, c = np.divmod(np.arange(len(self)), self.cols)
        col, row = c * self.cell, r * self.cell
        w = np.minimum(self.cell, self.width - col)
        h = np.minimum(self.cell, self.height - row)
        return np.stack([col, row, w, h], axis=1).astype(np.int64)

    def origin(self, index: int, scale: int) -> tuple[int, int]:
        """Top-left (col, row) of the ``scale`` window co-centred on cell ``index``."""
        r, c = divmod(index, self.cols)
        shift = (self.cell - scale) // 2
        return c * self.cell + shift, r * self.cell + shift

    def origins(self, scale: int) -> tuple[np.ndarray, np.ndarray]:
        """``origin`` of every cell at once: ([n] cols, [n] rows)."""
        r, c = np.divmod(np.arange(len(self)), self.cols)
        shift = (self.cell - scale) // 2
        return c * self.cell + shift, r * self.cell + shift

    def map_transform(self, transform: Affine) -> Affine:
        """Geotransform of the cell map: the scene's, scaled by the cell size."""
        return transform @ Affine.scale(self.cell)

    def valid(self, scene: Scene, max_nodata: float) -> np.ndarray:
        """[n] bool: cells whose smallest-scale window is at most ``max_nodata`` nodata.

        The part of the window outside the scene is exact geometry. Inside, one
        decimated read gives a validity grid with a step of about a quarter of the
        smallest window (or of the cell, if smaller), and a window's valid share is the
        valid share of the grid samples it covers (box sums over a summed-area table).
        """
        step = max(1, min(self.cell, *self.scales) // MASK_SAMPLES_PER_WINDOW)
        gh, gw = math.ceil(self.height / step), math.ceil(self.width / step)
        smallest = min(self.scales)
        cols0, rows0 = self.origins(smallest)
        frac_inside = (_overlap(cols0, smallest, self.width)
                       * _overlap(rows0, smallest, self.height) / smallest**2)
        if scene.has_mask:
            _, grid = scene.read_decimated((gh, gw))
            sat = np.zeros((gh + 1, gw + 1), np.int64)
            sat[1:, 1:] = grid.cumsum(0).cumsum(1)
            # the decimated read samples at (k + 0.5) * size / n: its true steps
            x0, x1 = _sample_span(cols0, smallest, self.width / gw, gw)
            y0, y1 = _sample_span(rows0, smallest, self.height / gh, gh)
            good = sat[y1, x1] - sat[y0, x1] - sat[y1, x0] + sat[y0, x0]
            frac_inside = frac_inside * good / np.maximum((x1 - x0) * (y1 - y0), 1)
        return np.asarray(1.0 - frac_inside <= max_nodata + 1e-9)


def _overlap(start: np.ndarray, size: int, n: int) -> np.ndarray:
    """Length of ``[start, start + size)`` inside ``[0, n)``."""
    return np.clip(np.minimum(start + size, n) - np.maximum(start, 0), 0, None)


def _sample_span(
    start: np.ndarray, size: int, step: float, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Grid samples (centres at ``(k + 0.5) * step``) inside ``[start, start + size)``."""
    lo = np.clip(np.ceil(start / step - 0.5), 0, n).astype(np.int64)
    hi = np.clip(np.ceil((start + size) / step - 0.5), 0, n).astype(np.int64)
    return lo, hi


@dataclass
class Batch:
    """Tiles of whole cells: ``tiles`` is [len(cells) * S, C, size, size], cell-major."""

    cells: np.ndarray
    tiles: np.ndarray
    read_seconds: float


def iter_batches(
    scene: Scene, grid: CellGrid, cells: np.ndarray, size: int, batch_size: int
) -> Iterator[Batch]:
    """Batches of up to ``batch_size`` tiles (whole cells, every scale) for sorted ``cells``.

    Per row of cells and per scale whose windows overlap (scale ≥ cell, the default),
    GDAL reads and resizes *one strip* (the window height, spanning the row's cells)
    straight to the model's resolution, and each tile is a slice of it: one read per row
    and scale instead of one per tile, and overlapping pixels are resampled once. Tile
    offsets in a strip are rounded to whole output pixels, a shift of at most half an
    output pixel (exact when ``cell * size`` is a multiple of the scale, as with GID's
    56/112/224 and any input size divisible by 4). Scales smaller than the cell, whose
    windows leave gaps, are read window by window.
    """
    per_batch = max(1, batch_size // len(grid.scales))
    rows = cells // grid.cols
    pending: list[int] = []
    tiles: list[np.ndarray] = []
    seconds = 0.0
    for r in np.unique(rows):
        t0 = time.perf_counter()
        row_cells = cells[rows == r]
        c_lo, c_hi = int(row_cells[0] % grid.cols), int(row_cells[-1] % grid.cols)
        strips: dict[int, np.ndarray] = {}
        for s in grid.scales:
            if s >= grid.cell:
                col, row = grid.origin(int(r) * grid.cols + c_lo, s)
                width_out = round((c_hi - c_lo) * grid.cell * size / s) + size
                span = (c_hi - c_lo) * grid.cell + s
                strips[s] = scene.read_window(col, row, span, s, width_out, size)
        for cell in row_cells:
            offset = (int(cell) % grid.cols - c_lo) * grid.cell
            for s in grid.scales:
                if s in strips:
                    x = round(offset * size / s)
                    tiles.append(strips[s][:, :, x : x + size])
                else:
                    col, row = grid.origin(int(cell), s)
                    tiles.append(scene.read_window(col, row, s, s, size, size))
            pending.append(int(cell))
            if len(pending) == per_batch:
                seconds += time.perf_counter() - t0
                yield Batch(np.asarray(pending), np.stack(tiles), seconds)
                pending, tiles, seconds = [], [], 0.0
                t0 = time.perf_counter()
        seconds += time.perf_counter() - t0
    if pending:
        yield Batch(np.asarray(pending), np.stack(tiles), seconds)


_DONE = object()


def read_ahead(batches: Iterator[Batch], depth: int) -> Generator[Batch, None, None]:
    """Run ``batches`` in a reader thread, ``depth`` batches ahead of the consumer.

    An exception in the reader is re-raised in the consumer; a consumer that stops early
    (error, break) stops the reader at its next batch. ``depth`` 0 reads synchronously.
    """
    if depth <= 0:
        yield from batches
        return
    q: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(_DONE)
        except BaseException as exc:  # handed to the consumer, which re-raises it
            put(exc)

    thread = threading.Thread(target=work, name="tile-reader", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, Batch)
            yield item
    finally:
        stop.set()
        thread.join()
