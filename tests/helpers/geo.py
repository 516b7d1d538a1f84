"""Geodesy helpers for checking output areas."""

from __future__ import annotations

import math


def local_area(lat_deg: float, dlon_deg: float, dlat_deg: float) -> float:
    """Independent check: M * N * cos(lat) * dlat * dlon with the WGS84 radii of curvature."""
    a, f = 6378137.0, 1 / 298.257223563
    e2 = f * (2 - f)
    lat = math.radians(lat_deg)
    w = math.sqrt(1 - e2 * math.sin(lat) ** 2)
    m, n = a * (1 - e2) / w**3, a / w
    return m * n * math.cos(lat) * math.radians(dlat_deg) * math.radians(dlon_deg)
