"""A strip of a scene read once at native resolution, resampled into many tiles by OpenCV.

The pipeline needs every cell at several co-centred scales, each resized to the model
input. Asking GDAL for each scale's strip resized (as it did first) read the same rows once
per scale and resampled them with GDAL's general-purpose kernel, and that reading competed
with onnxruntime for the box's cores: on a 2-core CPU a scene took 1.15–1.20× the model's
own time. A ``NativeStrip`` is one plain read (no resampling) of the rows all the scales'
windows of a row of cells span; each window is then resized from it by OpenCV's SIMD
resizer (area averaging when shrinking, bilinear when enlarging) and rescaled into the
model's value range. OpenCV runs single-threaded here: it works in the reader thread beside
onnxruntime, which owns the cores.

Values stay in the file's dtype until after resizing (rescaling is per-band affine, so it
commutes with interpolation up to its final clip), which keeps a strip a quarter of its
float32 size for 8-bit imagery. Dtypes OpenCV cannot resize are widened to float32 first.
The part of a window outside the scene is the bundle's neutral value, as ``Scene.read_window``
fills it; non-finite values become neutral too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

cv2.setNumThreads(1)

_RESIZABLE = (np.uint8, np.uint16, np.int16, np.float32, np.float64)


class Rescaler(Protocol):
    """What a strip needs of the scene's rescaling (``raster.Rescale``)."""

    def apply(self, raw: np.ndarray, axis: int = 0) -> np.ndarray: ...


@dataclass(frozen=True)
class NativeStrip:
    """Raw pixels [C,h,w] of the scene inside ``[col, col + w) x [row, row + h)``."""

    col: int
    row: int
    raw: np.ndarray
    rescale: Rescaler
    neutral: np.ndarray  # [C,1,1] float32

    @classmethod
    def of(cls, col: int, row: int, raw: np.ndarray, rescale: Rescaler,
           neutral: np.ndarray) -> NativeStrip:
        """A strip of ``raw`` (as read) at scene pixel ``(col, row)``."""
        if raw.dtype.type not in _RESIZABLE:
            raw = raw.astype(np.float32)
        return cls(col, row, raw, rescale, neutral)

    def window(self, col: int, row: int, width: int, height: int, out_w: int,
               out_h: int) -> np.ndarray:
        """The window at (col,row) resized to ``out_h`` x ``out_w`` and rescaled: [C,h,w]
        float32, neutral where the window leaves the strip (i.e. the scene)."""
        out = np.empty((len(self.neutral), out_h, out_w), np.float32)
        out[...] = self.neutral
        _, h, w = self.raw.shape
        c0, r0 = max(col, self.col), max(row, self.row)
        c1, r1 = min(col + width, self.col + w), min(row + height, self.row + h)
        kx, ky = out_w / width, out_h / height
        x0, x1 = round((c0 - col) * kx), round((c1 - col) * kx)
        y0, y1 = round((r0 - row) * ky), round((r1 - row) * ky)
        if c1 <= c0 or r1 <= r0 or x1 <= x0 or y1 <= y0:
            return out
        part = self.raw[:, r0 - self.row:r1 - self.row, c0 - self.col:c1 - self.col]
        size = (x1 - x0, y1 - y0)
        shrink = size[0] < part.shape[2] and size[1] < part.shape[1]
        how = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
        resized = np.stack([cv2.resize(band, size, interpolation=how) for band in part])
        values = self.rescale.apply(resized)
        if np.issubdtype(resized.dtype, np.floating):
            values = np.where(np.isfinite(resized), values, self.neutral)
        out[:, y0:y1, x0:x1] = values
        return out
