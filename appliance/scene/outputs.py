"""Scene outputs, all in the scene's CRS: maps (COG) with their GIS sidecars, GeoJSON.

The maps are written at cell resolution on a grid whose geotransform is the scene's
scaled by the grid step (``tiling.CellGrid``), so CRS, origin and far edges match the
input exactly: the map covers the scene and nothing past it.

- ``landuse.tif``: COG (GDAL's COG driver, or a tiled GTiff with internal overviews on
  a GDAL without it), uint8 class index, nodata 255, a colour table from the classes'
  colours, class names as tags ``CLASS_<i>=name`` (plus ``CLASSES`` as JSON), as GDAL
  category names and a raster attribute table (``landuse.tif.aux.xml``) and as a QGIS
  style (``landuse.qml``, see ``style``). Maps of at most one block get no overviews.
- ``confidence.tif``: COG, uint8 fused max probability in percent (0..100, band unit
  ``%``), nodata 255; uint8 keeps it small and is precise enough for a confidence map.
- ``landuse.geojson``: one polygon per connected region of a class (EPSG:4326) with its
  class, colour, ellipsoidal ``area_ha`` and ``mean_confidence`` (0..1).
- Maps are built by GDAL entirely in memory (``/vsimem/``) and written to disk by Python,
  so a full disk is an ordinary ``OSError`` (``ENOSPC``), never a crash inside GDAL;
  ``disk_full_guard`` turns it, and a results disk below ``paths.min_free_mb`` free, into
  ``SceneError("disk-full")``.
- Areas are ellipsoidal: each cell's corners are transformed to WGS84 and the cell's area
  is computed on the WGS84 ellipsoid through authalic latitudes, so EPSG:4326 and
  non-equal-area projections (Web Mercator) give true hectares.
"""

from __future__ import annotations

import errno
import json
import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import rasterio.features
import rasterio.warp
import scipy.ndimage
from rasterio.crs import CRS
from rasterio.enums import Resampling
from rasterio.io import MemoryFile
from rasterio.shutil import copy as raster_copy
from rasterio.transform import Affine

from appliance.contract.bundle import ClassSpec
from appliance.contract.durable import atomic_write_bytes, atomic_write_text
from appliance.scene.raster import SceneError
from appliance.scene.style import write_class_sidecars

NODATA = 255
WGS84 = CRS.from_epsg(4326)
BLOCK = 256

# WGS84 ellipsoid, for authalic-latitude (equal-area) cell areas.
_A = 6378137.0
_F = 1 / 298.257223563
_E2 = _F * (2 - _F)
_E = math.sqrt(_E2)


@dataclass(frozen=True)
class ClassMap:
    """A scene's cell map: labels and confidence on the cell grid, placed in the scene CRS."""

    labels: np.ndarray
    confidence: np.ndarray
    transform: Affine
    crs: CRS
    classes: list[ClassSpec]

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.labels.shape[0]), int(self.labels.shape[1])


# -- geometry ---------------------------------------------------------------------------


def _authalic_q(lat_rad: np.ndarray) -> np.ndarray:
    s = np.sin(lat_rad)
    return (1 - _E2) * (s / (1 - _E2 * s * s) - np.log((1 - _E * s) / (1 + _E * s)) / (2 * _E))


def ellipsoidal_areas(lon: np.ndarray, lat: np.ndarray) -> np.ndarray:
    """Areas (m²) of polygons [n,V] of lon/lat degrees on the WGS84 ellipsoid.

    Chamberlain–Duquette on the authalic sphere (exact for graticule-aligned cells,
    accurate to far below a percent for small cells of any projection).
    """
    q = _authalic_q(np.radians(lat))
    qp = _authalic_q(np.asarray(np.pi / 2))
    sin_beta = q / qp
    radius2 = _A * _A * qp / 2
    lam = np.radians(lon)
    dlam = np.roll(lam, -1, axis=1) - np.roll(lam, 1, axis=1)
    dlam = (dlam + np.pi) % (2 * np.pi) - np.pi  # cells crossing the antimeridian
    area = np.abs(radius2 / 2 * (dlam * sin_beta).sum(axis=1))
    return np.nan_to_num(area, nan=0.0, posinf=0.0)


def cell_areas_m2(windows: np.ndarray, transform: Affine, crs: CRS) -> np.ndarray:
    """True ground area (m²) of each [col,row,w,h] window of a scene in ``crs``."""
    col, row, w, h = (windows[:, i].astype(np.float64) for i in range(4))
    cols = np.stack([col, col + w, col + w, col], axis=1)
    rows = np.stack([row, row, row + h, row + h], axis=1)
    xs, ys = transform @ (cols, rows)
    lon, lat = rasterio.warp.transform(crs, WGS84, np.ravel(xs), np.ravel(ys))
    return ellipsoidal_areas(np.reshape(lon, cols.shape), np.reshape(lat, cols.shape))


def bounds_to_wgs84(bounds: np.ndarray, crs: CRS) -> np.ndarray:
    """[n,4] bounds in ``crs`` → [n,4] lon/lat bounds of their four corners."""
    if len(bounds) == 0:
        return np.zeros((0, 4))
    xs = bounds[:, [0, 2, 2, 0]]
    ys = bounds[:, [1, 1, 3, 3]]
    lon, lat = rasterio.warp.transform(crs, WGS84, np.ravel(xs), np.ravel(ys))
    lon, lat = np.reshape(lon, xs.shape), np.reshape(lat, ys.shape)
    return np.stack([lon.min(1), lat.min(1), lon.max(1), lat.max(1)], axis=1)


def footprint_wgs84(bounds: Sequence[float], crs: CRS, points: int = 21) -> dict[str, Any]:
    """The scene's bounds as a densified GeoJSON polygon in EPSG:4326."""
    minx, miny, maxx, maxy = bounds
    t = np.linspace(0, 1, points)[:-1]
    xs = np.concatenate([minx + (maxx - minx) * t, np.full_like(t, maxx),
                         maxx - (maxx - minx) * t, np.full_like(t, minx)])
    ys = np.concatenate([np.full_like(t, miny), miny + (maxy - miny) * t,
                         np.full_like(t, maxy), maxy - (maxy - miny) * t])
    lon, lat = rasterio.warp.transform(crs, WGS84, xs.tolist(), ys.tolist())
    ring = [[round(x, 7), round(y, 7)] for x, y in zip(lon, lat, strict=True)]
    return {"type": "Polygon", "coordinates": [[*ring, ring[0]]]}


def bbox_wgs84(bounds: Sequence[float], crs: CRS) -> tuple[float, float, float, float]:
    """Lon/lat bounding box of the scene's densified footprint (what the STAC bbox says)."""
    ring = np.asarray(footprint_wgs84(bounds, crs)["coordinates"][0])
    return (float(ring[:, 0].min()), float(ring[:, 1].min()),
            float(ring[:, 0].max()), float(ring[:, 1].max()))


# -- files ------------------------------------------------------------------------------


def _overview_count(shape: tuple[int, int]) -> int:
    """Overview levels until the smallest fits one block; none for a one-block map."""
    return max(0, min(6, math.ceil(math.log2(max(max(shape), 1) / BLOCK))))


@lru_cache(maxsize=1)
def has_cog_driver() -> bool:
    """True when this GDAL has the COG driver (GDAL ≥ 3.1)."""
    with rasterio.Env() as env:
        return "COG" in env.drivers()


def _write_cog(path: Path, data: np.ndarray, transform: Affine, crs: CRS, tags: dict[str, str],
               description: str, colours: dict[int, tuple[int, int, int, int]] | None,
               unit: str | None = None) -> None:
    """Write a one-band uint8 COG (nodata 255) through an in-memory GTiff.

    GDAL's COG driver where available; otherwise a tiled GTiff with internal overviews
    copied ahead of the pixels (``COPY_SRC_OVERVIEWS``), the layout a COG has.
    """
    h, w = data.shape
    profile = {"driver": "GTiff", "width": w, "height": h, "count": 1, "dtype": "uint8",
               "crs": crs, "transform": transform, "nodata": NODATA}
    levels = [2**i for i in range(1, _overview_count((h, w)) + 1)]
    with MemoryFile() as mem, MemoryFile() as out:
        with mem.open(**profile) as dst:
            if colours is not None:  # before the pixels: GTiff fixes photometric on write
                dst.write_colormap(1, colours)
            dst.set_band_description(1, description)
            if unit is not None:
                dst.set_band_unit(1, unit)
            dst.update_tags(1, **tags)
            dst.write(data.astype(np.uint8), 1)
            if not has_cog_driver() and levels:
                dst.build_overviews(levels, Resampling.nearest)
        with mem.open() as src:  # into memory too: GDAL never writes to the disk itself
            if has_cog_driver():
                extra = ({"OVERVIEW_COUNT": len(levels)} if levels
                         else {"OVERVIEWS": "NONE"})
                raster_copy(src, out.name, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=BLOCK,
                            OVERVIEW_RESAMPLING="NEAREST", **extra)
            else:
                raster_copy(src, out.name, driver="GTiff", TILED="YES", BLOCKXSIZE=BLOCK,
                            BLOCKYSIZE=BLOCK, COMPRESS="DEFLATE", COPY_SRC_OVERVIEWS="YES")
        encoded = out.read()
    atomic_write_bytes(path, encoded)


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


@contextmanager
def disk_full_guard(out_dir: Path, min_free_mb: int) -> Iterator[None]:
    """Writing a scene's outputs into ``out_dir``: refuse to start with less than
    ``min_free_mb`` MB free there, and turn running out of space (or quota) into
    ``SceneError("disk-full")``."""
    st = os.statvfs(out_dir)
    free_mb = st.f_bavail * st.f_frsize / (1 << 20)
    if free_mb < min_free_mb:
        raise SceneError("disk-full", f"{out_dir}: {free_mb:.1f} MB free, less than "
                         f"paths.min_free_mb ({min_free_mb})")
    try:
        yield
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            raise SceneError("disk-full", f"{out_dir}: out of space writing outputs: "
                             f"{exc}") from exc
        raise


def write_landuse(
    path: Path, labels: np.ndarray, transform: Affine, crs: CRS, classes: list[ClassSpec]
) -> Path:
    """A class map (``landuse.tif``, ``hybrid.tif``) with colour table, class names and its
    GIS sidecars; returns the QGIS style written beside it."""
    colours = {i: (*c.colour, 255) for i, c in enumerate(classes)}
    colours[NODATA] = (0, 0, 0, 0)
    tags = {f"CLASS_{i}": c.name for i, c in enumerate(classes)}
    tags["CLASSES"] = json.dumps([c.name for c in classes])
    _write_cog(path, labels, transform, crs, tags, path.stem, colours)
    return write_class_sidecars(path, classes, path.stem)


def write_confidence(path: Path, cmap: ClassMap) -> None:
    """``confidence.tif``: fused max probability in percent, uint8 0..100, nodata 255."""
    _write_cog(path, cmap.confidence, cmap.transform, cmap.crs, {"UNITS": "percent"},
               "confidence (percent)", None, unit="%")


def write_geojson(path: Path, cmap: ClassMap, cell_area_m2: np.ndarray) -> int:
    """``landuse.geojson``: one polygon per connected region of a class, EPSG:4326, with
    its ``area_ha`` (from the cells' ellipsoidal areas ``cell_area_m2`` [rows,cols]) and
    ``mean_confidence`` (0..1, area-weighted). Returns the number of features written."""
    valid = cmap.labels != NODATA
    regions = np.zeros(cmap.labels.shape, np.int32)
    count = 0
    for k in np.unique(cmap.labels[valid]):
        lab, n = scipy.ndimage.label(cmap.labels == k)  # 4-connected, as shapes() below
        regions[lab > 0] = lab[lab > 0] + count
        count += n
    conf = np.where(valid, cmap.confidence, 0).astype(np.float64) / 100
    area = np.bincount(regions.ravel(), cell_area_m2.ravel(), count + 1)
    weighted = np.bincount(regions.ravel(), (cell_area_m2 * conf).ravel(), count + 1)
    klass = np.zeros(count + 1, np.int64)
    klass[regions[valid]] = cmap.labels[valid]
    features = []
    shapes = rasterio.features.shapes(regions, mask=valid, transform=cmap.transform,
                                      connectivity=4)
    for geom, value in shapes:
        r = int(value)
        spec = cmap.classes[int(klass[r])]
        features.append({
            "type": "Feature",
            "geometry": rasterio.warp.transform_geom(cmap.crs, WGS84, geom, precision=7),
            "properties": {"class_id": int(klass[r]), "class": spec.name, "colour": spec.hex,
                           "area_ha": round(float(area[r]) / 1e4, 4),
                           "mean_confidence": round(float(weighted[r] / max(area[r], 1e-9)),
                                                    4)},
        })
    atomic_write_text(path, json.dumps({"type": "FeatureCollection", "features": features}))
    return len(features)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Any JSON document, written atomically."""
    atomic_write_text(path, json.dumps(payload, indent=2))
