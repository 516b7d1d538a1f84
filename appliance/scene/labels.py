"""Multi-label scene outputs: per-label probability and presence maps, shares, polygons.

A multi-label bundle gives every cell an independent sigmoid probability per label (cars
AND pavement AND trees), so the single-label map (the arg-max, kept as ``landuse.tif`` for
the dominant label) says nothing about how much of a scene holds cars. This module writes
what does, on the same cell grid and CRS as ``landuse.tif``:

- ``labels.tif``: COG, one uint8 band per label, fused probability in percent (0..100),
  nodata 255, each band's description the label name (``LABELS`` tag: the names as JSON);
- ``presence.tif``: COG, one uint8 band per label, 1 where the probability reaches the
  label's threshold, 0 below, nodata 255; band descriptions and ``THRESHOLDS`` tag;
- ``label-<name>.geojson``: polygons of presence of that label, EPSG:4326;
- per label, its share of the valid area and hectares (``labels`` in the summary, the STAC
  item and the result payload).

Thresholds are the bundle's per-label F1-calibrated ones (``ClassSpec.threshold``), each
replaceable in the config (``labels.thresholds``).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio.features
import rasterio.warp
from rasterio.crs import CRS
from rasterio.io import MemoryFile
from rasterio.shutil import copy as raster_copy
from rasterio.transform import Affine

from appliance.contract.bundle import Manifest
from appliance.contract.durable import atomic_write_bytes, atomic_write_text
from appliance.contract.payloads import ClassShare
from appliance.scene.outputs import NODATA, WGS84, has_cog_driver

log = logging.getLogger(__name__)

PROBABILITIES_FILE = "labels.tif"
PRESENCE_FILE = "presence.tif"


@dataclass(frozen=True)
class LabelOutputs:
    """What ``write_label_outputs`` produced: files by output key, shares, thresholds."""

    files: dict[str, Path]
    shares: dict[str, ClassShare]
    thresholds: dict[str, float]



def thresholds_for(manifest: Manifest, overrides: Mapping[str, float]) -> np.ndarray:
    """[K] presence thresholds: the bundle's, with configured overrides by label name.

    An override naming no label of the bundle is logged and ignored (the config outlives
    bundles; the scene must not fail over it).
    """
    names = manifest.class_names
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        log.warning("labels.thresholds names %s, not labels of bundle %s v%d (%s): ignored",
                    unknown, manifest.name, manifest.version, names)
    th = manifest.thresholds.copy()
    for k, name in enumerate(names):
        if name in overrides:
            th[k] = float(overrides[name])
    return th


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _write_bands(path: Path, bands: np.ndarray, transform: Affine, crs: CRS,
                 names: list[str], tags: dict[str, str]) -> None:
    """A multi-band uint8 COG (nodata 255, band ``i`` described as ``names[i]``), built in
    memory and written by Python, so a full disk is an ordinary ``OSError`` as for the
    single-band maps of ``outputs``."""
    count, h, w = bands.shape
    profile = {"driver": "GTiff", "width": w, "height": h, "count": count, "dtype": "uint8",
               "crs": crs, "transform": transform, "nodata": NODATA,
               "interleave": "band"}
    with MemoryFile() as mem, MemoryFile() as out:
        with mem.open(**profile) as dst:
            for i, name in enumerate(names, start=1):
                dst.set_band_description(i, name)
            dst.update_tags(**tags)
            dst.write(bands.astype(np.uint8))
        with mem.open() as src:
            if has_cog_driver():
                raster_copy(src, out.name, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=256,
                            OVERVIEW_RESAMPLING="NEAREST")
            else:
                raster_copy(src, out.name, driver="GTiff", TILED="YES", BLOCKXSIZE=256,
                            BLOCKYSIZE=256, COMPRESS="DEFLATE")
        encoded = out.read()
    atomic_write_bytes(path, encoded)


def _write_presence_geojson(path: Path, present: np.ndarray, valid: np.ndarray, name: str,
                            transform: Affine, crs: CRS) -> None:
    """Polygons (EPSG:4326) of the connected cells where the label is present."""
    mask = present & valid
    features = [
        {"type": "Feature",
         "geometry": rasterio.warp.transform_geom(crs, WGS84, geom, precision=7),
         "properties": {"label": name}}
        for geom, _ in rasterio.features.shapes(mask.astype(np.uint8), mask=mask,
                                                transform=transform, connectivity=4)]
    atomic_write_text(path, json.dumps({"type": "FeatureCollection", "features": features}))


def write_label_outputs(out_dir: Path, probs: np.ndarray, valid: np.ndarray,
                        areas_m2: np.ndarray, shape: tuple[int, int], transform: Affine,
                        crs: CRS, manifest: Manifest,
                        overrides: Mapping[str, float]) -> LabelOutputs:
    """Write the label maps and polygons of one scene; return files and per-label shares.

    ``probs`` [n,K] fused sigmoid probabilities per cell, ``valid`` [n], ``areas_m2`` [v]
    the true ground area of each valid cell (in cell order), ``shape`` (rows, cols) of the
    cell grid placed by ``transform``.
    """
    names = manifest.class_names
    th = thresholds_for(manifest, overrides)
    present = probs >= th[None, :]
    rows, cols = shape
    percent = np.where(valid[:, None], np.round(probs * 100), NODATA).astype(np.uint8)
    flags = np.where(valid[:, None], present, NODATA).astype(np.uint8)
    files = {"labels": out_dir / PROBABILITIES_FILE, "presence": out_dir / PRESENCE_FILE}
    _write_bands(files["labels"], percent.T.reshape(-1, rows, cols), transform, crs, names,
                 {"LABELS": json.dumps(names), "UNITS": "percent"})
    _write_bands(files["presence"], flags.T.reshape(-1, rows, cols), transform, crs, names,
                 {"LABELS": json.dumps(names),
                  "THRESHOLDS": json.dumps({n: float(t) for n, t in zip(names, th, strict=True)})})
    valid_grid = valid.reshape(rows, cols)
    for k, name in enumerate(names):
        key = f"label-{_safe(name)}"
        files[key] = out_dir / f"{key}.geojson"
        _write_presence_geojson(files[key], present[:, k].reshape(rows, cols), valid_grid, name,
                                transform, crs)
    total = float(areas_m2.sum())
    held = present[valid]
    shares = {name: ClassShare(
        fraction=float(areas_m2[held[:, k]].sum() / total) if total > 0 else 0.0,
        area_ha=float(areas_m2[held[:, k]].sum() / 1e4)) for k, name in enumerate(names)}
    return LabelOutputs(files, shares, {n: float(t) for n, t in zip(names, th, strict=True)})
