"""An image file as the model sees it: reference images and image queries become one tile.

The chip is decoded by the contract's chip reader (``appliance.contract.chips``, the one
the workstation trains with) at the model's input size, its bands chosen by
``input.bands`` (numbers; a band name stands for that band's place in the model's order,
as in a picture chip). Its values are then mapped into the bundle's value range
by ``input.rescale`` exactly as a scene's are (``appliance.scene.raster.choose_rescale``),
with the statistics of a percentile stretch taken from the chip itself, nodata included:
with the default ``auto``, an 8-bit chip keeps its values and any other gets a per-band
2–98 % stretch (a constant band maps to mid-range). The file is opened as a scene is:
only ``input.drivers`` (pictures: PNG/JPEG), no network, at most ``input.max_pixels``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from appliance.config import InputConfig
from appliance.contract.bundle import InputSpec
from appliance.contract.chips import ChipError, read_chip
from appliance.retrieval.query import RequestError
from appliance.scene.bands import BandError, positional_bands
from appliance.scene.raster import choose_rescale


def read_tile(path: Path, spec: InputSpec, cfg: InputConfig) -> np.ndarray:
    """One [C,S,S] float32 tile in ``spec.value_range``.

    ``RequestError`` codes: ``format`` (a driver not in ``input.drivers``, a VRT, a URL),
    ``too-large`` (more than ``input.max_pixels``), ``bands`` (the bands asked for are not
    there) and ``bad-image`` (unreadable, or NaN/infinite values).
    """
    n = len(spec.bands)
    try:
        bands = positional_bands(cfg.bands, spec.bands)
    except BandError as exc:
        raise RequestError("bad-image", f"{path}: {exc}") from exc
    if len(bands) != n:
        raise RequestError("bands", f"{path}: input.bands lists {len(bands)} bands, "
                           f"the model needs {n}")
    try:
        raw = read_chip(path, bands, spec.size, drivers=cfg.drivers,
                        max_pixels=cfg.max_pixels).data
    except ChipError as exc:  # refused as a scene would be, with the same reason
        code = "bad-image" if exc.reason == "unreadable" else exc.reason
        raise RequestError(code, str(exc)) from exc
    if np.issubdtype(raw.dtype, np.floating) and not np.isfinite(raw).all():
        raise RequestError("bad-image", f"{path}: has NaN or infinite values")
    rescale = choose_rescale(cfg, str(raw.dtype), spec, raw.reshape(n, -1).T)
    return rescale.apply(raw)
