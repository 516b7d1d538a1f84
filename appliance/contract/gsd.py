"""Ground sampling distance of a georeferenced raster, in metres per pixel.

Measured at the raster's centre as the ground distance on the WGS84 ellipsoid between the
centre pixel and its neighbours along both axes, so a geographic CRS (degrees) and a
projection with scale distortion (Web Mercator away from the equator) give true metres.
Shared by the box (a scene's GSD) and the exporter (the GSD of georeferenced chips).
"""

from __future__ import annotations

import math

import numpy as np
import rasterio.warp
from rasterio.crs import CRS
from rasterio.transform import Affine

WGS84 = CRS.from_epsg(4326)
_A = 6378137.0
_E2 = (1 / 298.257223563) * (2 - 1 / 298.257223563)


def scene_gsd(transform: Affine, crs: CRS, width: int, height: int) -> float | None:
    """Metres per pixel at the scene centre (geometric mean of both axes); None when the
    CRS cannot be placed on the Earth."""
    step = 10.0
    cx, cy = width / 2, height / 2
    cols = np.array([cx, cx + step, cx])
    rows = np.array([cy, cy, cy + step])
    xs, ys = transform @ (cols, rows)
    try:
        lon, lat = rasterio.warp.transform(crs, WGS84, list(xs), list(ys))
    except Exception:  # an engineering or local CRS with no path to WGS84
        return None
    lon_r, lat_r = np.radians(lon), np.radians(lat)
    phi = lat_r[0]
    w = 1 - _E2 * math.sin(phi) ** 2
    meridian = _A * (1 - _E2) / w**1.5  # metres per radian of latitude
    normal = _A / math.sqrt(w) * math.cos(phi)  # metres per radian of longitude

    def dist(i: int) -> float:
        dlon = (lon_r[i] - lon_r[0] + math.pi) % (2 * math.pi) - math.pi
        return float(math.hypot(dlon * normal, (lat_r[i] - lat_r[0]) * meridian))

    gx, gy = dist(1) / step, dist(2) / step
    if not (gx > 0 and gy > 0 and math.isfinite(gx * gy)):
        return None
    return math.sqrt(gx * gy)
