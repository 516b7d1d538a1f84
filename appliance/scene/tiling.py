"""The GID multi-scale grid: cells, co-centred windows at every scale, batches, read-ahead.

A scene is cut into ``rows`` x ``cols`` cells of about ``cell`` px: the grid step is
``width / cols`` by ``height / rows`` (cell edges rounded to whole pixels), so the cells
tile the scene exactly, the map they make covers the scene and nothing past it, and
there is no sliver of a last row or column left unclassified. Around each cell centre sits
one square window per scale (e.g. 56, 112, 224 px of the scene), each resized to the
model input. A window is kept inside the scene when it fits (an edge cell's windows are
shifted inward, so they still hold the cell and see real context rather than padding);
only a window larger than the scene reaches past its edges, padded as
``raster.Scene.read_window`` does. A cell is *valid* when at most ``nodata_fraction`` of
its window at the smallest scale is nodata or outside the scene; invalid cells are never
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
    """Cells of about ``cell`` px tiling a ``width`` x ``height`` scene, and their windows."""

    width: int
    height: int
    cell: int
    scales: tuple[int, ...]

    @property
    def rows(self) -> int:
        return max(1, int(self.height / self.cell + 0.5))

    @property
    def cols(self) -> int:
        return max(1, int(self.width / self.cell + 0.5))

    def __len__(self) -> int:
        return self.rows * self.cols

    def _edges(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel edges of the cell columns [cols+1] and rows [rows+1]."""
        cols = np.floor(np.arange(self.cols + 1) * self.width / self.cols + 0.5)
        rows = np.floor(np.arange(self.rows + 1) * self.height / self.rows + 0.5)
        return cols.astype(np.int64), rows.astype(np.int64)

    def windows(self) -> np.ndarray:
        """[n,4] ``col_off, row_off, width, height`` of every cell; they tile the scene."""
        ce, re_ = self._edges()
        r, c = np.divmod(np.arange(len(self)), self.cols)
        return np.stack([ce[c], re_[r], ce[c + 1] - ce[c], re_[r + 1] - re_[r]],
                        axis=1).astype(np.int64)

    def origins(self, scale: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-left ([n] cols, [n] rows) of every cell's ``scale`` window: centred on the
        cell, shifted inside the scene when it fits, centred on the scene when not."""
        ce, re_ = self._edges()
        r, c = np.divmod(np.arange(len(self)), self.cols)
        return (_place(ce[c] + ce[c + 1], scale, self.width),
                _place(re_[r] + re_[r + 1], scale, self.height))

    def origin(self, index: int, scale: int) -> tuple[int, int]:
        """Top-left (col, row) of the ``scale`` window of cell ``index``."""
        cols, rows = self.origins(scale)
        return int(cols[index]), int(rows[index])

    def map_transform(self, transform: Affine) -> Affine:
        """Geotransform of the cell map: the scene's, scaled by the grid step, so the map
        covers exactly the scene."""
        return transform @ Affine.scale(self.width / self.cols, self.height / self.rows)

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


def _place(twice_centre: np.ndarray, scale: int, n: int) -> np.ndarray:
    """Window starts for centres ``twice_centre / 2`` in a scene ``n`` px long."""
    start = (twice_centre - scale) // 2
    if scale > n:
        return np.full_like(start, (n - scale) // 2)
    return np.clip(start, 0, n - scale)


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

    Per row of cells, one native read (``raster.Scene.read_strip``) spans the windows of
    every scale whose windows overlap (scale ≥ cell, the default); per scale, *one strip*
    of it (the window height, spanning the row's windows) is resized to the model's
    resolution (``strip.NativeStrip``), and each tile is a slice of that: one read per row
    instead of one per tile or per scale, and overlapping pixels are resampled once. Tile
    offsets in a strip are rounded to whole output pixels, a shift of at most half an
    output pixel (exact when the offsets times ``size`` are multiples of the scale, as
    with GID's 56/112/224 on a scene a multiple of 56 px wide and any input size divisible
    by 4). Scales smaller than the cell, whose windows leave gaps, are read window by
    window.
    """
    per_batch = max(1, batch_size // len(grid.scales))
    origins = {s: grid.origins(s) for s in grid.scales}
    rows = cells // grid.cols
    pending: list[int] = []
    tiles: list[np.ndarray] = []
    seconds = 0.0
    for r in np.unique(rows):
        t0 = time.perf_counter()
        row_cells = cells[rows == r]
        strips: dict[int, tuple[int, np.ndarray]] = {}
        spans = {s: (int(origins[s][0][row_cells].min()), int(origins[s][0][row_cells].max()),
                     int(origins[s][1][row_cells[0]])) for s in grid.scales if s >= grid.cell}
        if spans:
            left = min(c0 for c0, _, _ in spans.values())
            top = min(r0 for _, _, r0 in spans.values())
            right = max(c1 + s for s, (_, c1, _) in spans.items())
            bottom = max(r0 + s for s, (_, _, r0) in spans.items())
            native = scene.read_strip(left, top, right - left, bottom - top)
            for s, (col0, col1, row0) in spans.items():
                width_out = round((col1 - col0) * size / s) + size
                strips[s] = (col0, native.window(col0, row0, col1 - col0 + s, s, width_out,
                                                 size))
        for cell in row_cells:
            for s in grid.scales:
                if s in strips:
                    col0, strip = strips[s]
                    x = round((int(origins[s][0][cell]) - col0) * size / s)
                    tiles.append(strip[:, :, x : x + size])
                else:
                    tiles.append(scene.read_window(int(origins[s][0][cell]),
                                                   int(origins[s][1][cell]), s, s, size, size))
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
