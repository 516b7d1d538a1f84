"""Raster reading: open a scene, validate it, map its bands and rescale its values.

Everything here reads in windows or decimated (``out_shape``) views, so a 10980² scene is
never held whole: the statistics for the percentile stretch come from an overview read
of at most ``input.rescale.sample_size`` pixels a side, tiles come from windowed reads
resized to the model input by GDAL at read time, and the nodata mask comes from one
decimated read at a fraction of the cell size.

Values are rescaled into the bundle's ``input.value_range`` as ``raw * gain + bias`` per
band, clipped to the range. Pixels outside the scene (windows reaching past an edge) are
filled with the band's *neutral* value, the one the bundle normalises to zero, so an
edge cell is not biased by an artificial black frame; nodata pixels inside the scene
keep their rescaled value and are accounted for by the cell's valid fraction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import RasterioError
from rasterio.io import DatasetReader
from rasterio.windows import Window

from appliance.config import InputConfig
from appliance.contract.bundle import InputSpec
from appliance.contract.raster_open import (
    RasterRefused,
    check_local_file,
    open_raster,
    open_remote_raster,
)
from appliance.scene.bands import BandError, choose_bands
from appliance.scene.source import SceneSource
from appliance.scene.strip import NativeStrip

DRIFT_SAMPLE = 20_000
STATS_SAMPLE = 1 << 18  # overview pixels behind the percentile stretch
STRIP_BYTES = 32 << 20  # full-width strip reads for overviews stay below this
MAX_BLOCK_BYTES = 256 << 20  # one GDAL block (all selected bands) decoded at once


class SceneError(Exception):
    """A scene that cannot be processed; ``reason`` is the slug used for ``failed/<reason>/``.

    Reasons: ``unreadable`` (corrupt, truncated, not a raster), ``empty`` (no pixels),
    ``bands`` (the scene's bands cannot be mapped to the model's: see ``bands``),
    ``nodata`` (nothing valid),
    ``too-small`` (smaller than the smallest window, nothing valid), ``no-crs`` (not
    georeferenced, so no map can be placed), ``format`` (a file format outside
    ``input.drivers``, or a VRT with network or out-of-tree sources), ``too-large`` (a
    declared size above ``input.max_pixels``, checked before any pixel is read),
    ``disk-full`` (the results disk has less than ``paths.min_free_mb`` free, or ran out),
    ``resolution`` (the scene's GSD is too far from the bundle's and
    ``input.gsd_policy`` is ``refuse``).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Rescale:
    """Per-band ``raw * gain + bias`` into ``value_range``; ``mode`` says how it was chosen."""

    mode: str
    gain: np.ndarray
    bias: np.ndarray
    value_range: tuple[float, float]

    def apply(self, raw: np.ndarray, axis: int = 0) -> np.ndarray:
        """Rescale raw values whose band axis is ``axis`` into float32, clipped to the range."""
        shape = [1] * raw.ndim
        shape[axis] = -1
        out = raw.astype(np.float32)  # then in place: strips can be tens of MB
        out *= self.gain.reshape(shape)
        out += self.bias.reshape(shape)
        return np.clip(out, *self.value_range, out=out)

    def as_dict(self) -> dict[str, object]:
        return {"mode": self.mode, "gain": self.gain.tolist(), "bias": self.bias.tolist()}


def choose_rescale(
    cfg: InputConfig, dtype: str, spec: InputSpec, pixels: np.ndarray
) -> Rescale:
    """The rescale for a scene of ``dtype`` from its valid overview ``pixels`` [P,C]."""
    c = pixels.shape[1]
    lo_v, hi_v = spec.value_range
    mode = cfg.rescale.mode
    if mode == "auto":
        mode = "none" if dtype == "uint8" else "percentile"
    if mode == "none":
        gain, bias = np.ones(c), np.zeros(c)
    elif mode == "linear":
        gain, bias = np.full(c, cfg.rescale.factor), np.full(c, cfg.rescale.offset)
    else:
        # A constant band (no spread between the percentiles) carries no contrast: it maps
        # to the middle of the range rather than its bottom (gain 0, bias mid-range).
        lo, hi = np.percentile(pixels.astype(np.float64), cfg.rescale.percentiles, axis=0)
        flat = ~(hi > lo)
        span = np.where(flat, 1.0, hi - lo)
        gain = np.where(flat, 0.0, (hi_v - lo_v) / span)
        bias = np.where(flat, (lo_v + hi_v) / 2, lo_v - lo * gain)
    return Rescale(mode, gain.astype(np.float32), bias.astype(np.float32), (lo_v, hi_v))


class Scene:
    """An open scene: selected bands, rescale, nodata handling and windowed tile reads.

    Use as a context manager (``with open_scene(...) as scene``). Reads may raise
    ``SceneError("unreadable")``: a truncated GeoTIFF often opens and fails on a block.
    """

    def __init__(self, source: SceneSource, cfg: InputConfig, spec: InputSpec) -> None:
        self.source = source
        self.name = source.name
        self.use_spec(spec)
        try:
            with rasterio.Env(**source.gdal_env()):
                self.ds = (open_remote_raster(source.gdal_path(), self.name, cfg.max_pixels)
                           if source.is_remote else self._open_local(source.path, cfg))
        except RasterRefused as exc:
            raise SceneError(exc.reason, exc.message) from exc
        except (RasterioError, OSError) as exc:
            raise SceneError("unreadable", f"{self.name} is not a readable raster: {exc}") from exc
        try:
            self._validate(cfg)
            self.overview, self.overview_valid = self._read_overview(cfg.rescale.sample_size)
            if not self.overview_valid.any():
                raise SceneError("nodata", f"{self.name}: every pixel is nodata")
            pixels = self.valid_pixels(STATS_SAMPLE)
            self.rescale = choose_rescale(cfg, self.dtype, spec, pixels)
        except BaseException:
            self.ds.close()
            raise

    @staticmethod
    def _open_local(path: Path, cfg: InputConfig) -> DatasetReader:
        check_local_file(path)
        if path.stat().st_size == 0:
            raise SceneError("unreadable", f"{path.name} is a zero-byte file")
        return open_raster(path, cfg.drivers, cfg.max_pixels)

    def use_spec(self, spec: InputSpec) -> None:
        """Read for a model with input ``spec``: its neutral value fills outside the scene.

        The pipeline switches to a routed expert's spec (same bands and value range, other
        mean/std) once the scene's statistics are known.
        """
        self.spec = spec
        neutral = np.asarray(spec.mean, np.float32) / np.float32(spec.scale)
        self.neutral = neutral.reshape(-1, 1, 1)

    def _validate(self, cfg: InputConfig) -> None:
        ds = self.ds
        if ds.width == 0 or ds.height == 0 or ds.count == 0:
            raise SceneError("empty", f"{self.name}: {ds.width}x{ds.height}, {ds.count} bands")
        try:
            self.band_choice = choose_bands(ds, self.spec.bands, cfg.bands, self.name)
        except BandError as exc:
            raise SceneError("bands", str(exc)) from exc
        bands = self.band_choice.indexes
        bw, bh = ds.block_shapes[0]
        block = bw * bh * len(bands) * max(np.dtype(t).itemsize for t in ds.dtypes)
        if block > MAX_BLOCK_BYTES:
            raise SceneError("too-large", f"{self.name}: one {bw}x{bh} block is "
                             f"{block >> 20} MB decoded")
        if ds.crs is None or ds.transform.is_identity:
            raise SceneError("no-crs", f"{self.name} has no CRS or geotransform")
        self.bands = bands
        self.dtype = str(ds.dtypes[bands[0] - 1])
        nodata = cfg.nodata if cfg.nodata is not None else ds.nodatavals[bands[0] - 1]
        self.nodata: float | None = None if nodata is None else float(nodata)
        flags = ds.mask_flag_enums[bands[0] - 1]
        self._gdal_mask = self.nodata is None and (
            MaskFlags.per_dataset in flags or MaskFlags.alpha in flags
        )

    # -- properties ---------------------------------------------------------------------

    @property
    def width(self) -> int:
        return int(self.ds.width)

    @property
    def height(self) -> int:
        return int(self.ds.height)

    @property
    def crs(self) -> CRS:
        return self.ds.crs

    @property
    def crs_string(self) -> str:
        """``EPSG:n`` when the CRS has a code, WKT otherwise."""
        epsg = self.ds.crs.to_epsg()
        return f"EPSG:{epsg}" if epsg else str(self.ds.crs.to_wkt())

    @property
    def has_mask(self) -> bool:
        """True when some pixels may be nodata: a nodata value, a GDAL mask/alpha, or a
        floating-point scene (NaN and infinities are nodata whatever the tags say)."""
        return (self.nodata is not None or self._gdal_mask
                or bool(np.issubdtype(np.dtype(self.dtype), np.floating)))

    # -- reads --------------------------------------------------------------------------

    def _valid_from(self, raw: np.ndarray) -> np.ndarray:
        """Valid pixels of raw [C,h,w] data: not every band equal to nodata (GDAL's rule)."""
        if self.nodata is None:
            return np.ones(raw.shape[1:], bool)
        if math.isnan(self.nodata):
            return ~np.isnan(raw).all(axis=0)
        return ~(raw == self.nodata).all(axis=0)

    def read_decimated(self, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Raw bands [C,h,w] and valid mask [h,w] of the whole scene at ``shape`` (nearest).

        With internal overviews fine enough, GDAL reads from them. Otherwise the scene is
        read in full-width strips of ``STRIP_BYTES`` at most and subsampled in numpy: GDAL's
        own decimated read of a file without overviews is some 50x slower than that.
        """
        h, w = shape
        try:
            if self._has_overview_for(self.height / h):
                raw = self.ds.read(self.bands, out_shape=(len(self.bands), h, w),
                                   resampling=Resampling.nearest)
                mask = (self.ds.read_masks(self.bands[0], out_shape=shape,
                                           resampling=Resampling.nearest) > 0
                        if self._gdal_mask else None)
            else:
                raw, mask = self._subsample(h, w)
        except RasterioError as exc:
            raise SceneError("unreadable", _read_failure(self.name, exc)) from exc
        valid = mask if mask is not None else self._valid_from(raw)
        if np.issubdtype(raw.dtype, np.floating):
            valid &= np.isfinite(raw).all(axis=0)
        return raw, valid

    def _has_overview_for(self, factor: float) -> bool:
        levels = self.ds.overviews(self.bands[0])
        return bool(levels) and min(levels) <= factor

    def _subsample(self, h: int, w: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Nearest subsampling through bounded full-width strip reads."""
        rows = ((np.arange(h) + 0.5) * self.height / h).astype(np.int64)
        cols = ((np.arange(w) + 0.5) * self.width / w).astype(np.int64)
        itemsize = np.dtype(self.dtype).itemsize
        strip = max(1, STRIP_BYTES // (self.width * len(self.bands) * itemsize))
        raw = np.empty((len(self.bands), h, w), self.dtype)
        mask = np.empty((h, w), bool) if self._gdal_mask else None
        for r0 in range(0, self.height, strip):
            picked = np.flatnonzero((rows >= r0) & (rows < r0 + strip))
            if len(picked) == 0:
                continue
            window = Window(0, r0, self.width, min(strip, self.height - r0))
            local = rows[picked] - r0
            raw[:, picked] = self.ds.read(self.bands, window=window)[:, local][:, :, cols]
            if mask is not None:
                m = self.ds.read_masks(self.bands[0], window=window)
                mask[picked] = m[local][:, cols] > 0
        return raw, mask

    def _read_overview(self, sample_size: int) -> tuple[np.ndarray, np.ndarray]:
        f = min(1.0, sample_size / max(self.width, self.height))
        shape = (max(1, round(self.height * f)), max(1, round(self.width * f)))
        return self.read_decimated(shape)

    def overview_rescaled(self) -> np.ndarray:
        """The overview [C,h,w] in the model's value range (nodata pixels neutral)."""
        out = self.rescale.apply(self.overview)
        return np.where(self.overview_valid[None], out, self.neutral)

    def valid_pixels(self, cap: int) -> np.ndarray:
        """Up to ``cap`` valid overview pixels [p,C] (raw), evenly spread over the scene."""
        flat = np.flatnonzero(self.overview_valid)
        if len(flat) > cap:
            flat = flat[np.linspace(0, len(flat) - 1, cap).astype(np.int64)]
        return self.overview.reshape(len(self.bands), -1)[:, flat].T

    def band_sample(self, cap: int = DRIFT_SAMPLE) -> np.ndarray:
        """Up to ``cap`` valid overview pixels [p,C], rescaled: the drift monitor's input."""
        return self.rescale.apply(self.valid_pixels(cap), axis=1)

    def read_window(
        self, col: int, row: int, width: int, height: int, out_w: int, out_h: int
    ) -> np.ndarray:
        """The window at (col,row) resized to ``out_h`` x ``out_w``, rescaled: [C,h,w] float32.

        The part of the window inside the scene is read at native resolution and resized by
        the tile resampler (``strip.NativeStrip``, the same one the pipeline's strips use);
        the part outside is filled with the neutral value. Raises ``SceneError`` on a failed
        block read.
        """
        return self.read_strip(col, row, width, height).window(col, row, width, height,
                                                               out_w, out_h)

    def read_strip(self, col: int, row: int, width: int, height: int) -> NativeStrip:
        """The pixels of the window at (col,row) that lie inside the scene, as stored, in
        one read without resampling: tiles of many windows within it are then resized from
        it (``NativeStrip.window``). Raises ``SceneError`` on a failed block read."""
        c0, r0 = max(col, 0), max(row, 0)
        c1, r1 = max(c0, min(col + width, self.width)), max(r0, min(row + height, self.height))
        try:
            raw = (self.ds.read(self.bands, window=Window(c0, r0, c1 - c0, r1 - r0))
                   if c1 > c0 and r1 > r0 else np.zeros((len(self.bands), 0, 0), self.dtype))
        except RasterioError as exc:
            raise SceneError("unreadable", _read_failure(self.name, exc)) from exc
        return NativeStrip.of(c0, r0, raw, self.rescale, self.neutral)

    # -- context manager ----------------------------------------------------------------

    def close(self) -> None:
        self.ds.close()

    def __enter__(self) -> Scene:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def open_scene(source: SceneSource | Path, cfg: InputConfig, spec: InputSpec) -> Scene:
    """Open and validate a scene (a source, or a local file) for a model with input
    ``spec``; raise ``SceneError``."""
    return Scene(source if isinstance(source, SceneSource) else SceneSource.file(Path(source)),
                 cfg, spec)


def _read_failure(name: str, exc: RasterioError) -> str:
    """GDAL's own message for a failed read (rasterio hides it in ``__cause__``)."""
    cause = exc.__cause__ or exc.__context__
    return f"{name}: read failed (truncated or corrupt?): {cause or exc}"
