"""Opening an untrusted raster file: an explicit driver allow-list, no network, no references.

GDAL opens anything it has a driver for, and some formats are references rather than
pixels: a 1 KB VRT reads any raster on the disk, ``<GDAL_WMS>`` or a ``/vsicurl/`` source
makes the box send HTTP requests. Every reader of files that arrive from outside (scenes,
GeoTIFF chips, image queries) opens them through ``open_raster``:

* the path must be a plain local regular file (no ``/vsi…`` prefix, no ``scheme://``);
* the file's first bytes decide its format (TIFF, XML, PNG, JPEG); a format outside
  ``drivers`` is refused with reason ``format`` before GDAL sees the file, and GDAL itself
  is only offered ``drivers`` (rasterio's ``driver=`` list, GDAL's ``allowed_drivers``);
* a VRT (only when ``"VRT"`` is in ``drivers``) must be a ``VRTDataset`` whose every
  source is a TIFF file inside the VRT's own directory tree: no network or ``/vsi``
  sources, no connection strings, no nested VRTs, no Python pixel functions;
* the declared size (width x height) must be at most ``max_pixels`` (reason ``too-large``),
  checked right after the header is parsed, before any pixel is read.

A remote object (a scene job's URL, already checked by its scheme and name) opens with
``open_remote_raster``: the GeoTIFF driver only, whatever the object says it is, and the
same ``max_pixels`` check; the GDAL configuration it reads under opens the network for
that object alone (``appliance.scene.source``).

``SAFE_GDAL`` is the GDAL configuration to read under (``rasterio.Env(**SAFE_GDAL)``):
no sidecar discovery, no HTTP, no Python in VRTs, as a second line behind the checks.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

import rasterio
from rasterio.errors import RasterioError
from rasterio.io import DatasetReader

DEFAULT_DRIVERS = ("GTiff", "COG")
TIFF_DRIVERS = frozenset({"GTiff", "COG"})  # COG is write-only in GDAL: GTiff reads COGs
MAX_VRT_BYTES = 1 << 20

SAFE_GDAL: dict[str, str | int | bool] = {
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",  # no .ovr/.msk/.aux.xml found beside a file
    "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".terratile-no-network",  # /vsicurl/ opens nothing
    "GDAL_HTTP_MAX_RETRY": 0,
    "GDAL_HTTP_TIMEOUT": 1,
    "GDAL_HTTP_CONNECTTIMEOUT": 1,
    "GDAL_VRT_ENABLE_PYTHON": "NO",
}

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def _not_a_path(text: str) -> bool:
    """True for what GDAL reads as other than a local file: ``/vsi…`` handlers (curl, s3,
    zip…, chained too) and URLs."""
    return text.lower().startswith("/vsi") or "://" in text


# GDAL matches VRT element and attribute names case-insensitively: so do the checks.
_SOURCE_TAGS = frozenset({"sourcefilename", "sourcedataset"})
_CODE_TAGS = frozenset({"pixelfunctionlanguage", "pixelfunctioncode"})


class RasterRefused(ValueError):
    """A raster file refused before (or instead of) being read; ``reason`` is a slug:
    ``format``, ``too-large`` or ``unreadable``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def sniff(path: Path) -> str:
    """The format a file's first bytes say it is: ``tiff``, ``xml``, ``png``, ``jpeg`` or ``?``."""
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
        return "xml"
    return "?"


def check_local_file(path: Path) -> Path:
    """``path`` made absolute; refuse anything GDAL would read as other than a local file."""
    text = str(path)
    if _not_a_path(text):
        raise RasterRefused("format", f"{path.name}: not a local file path")
    absolute = Path(os.path.abspath(path))
    if not absolute.is_file():
        raise RasterRefused("unreadable", f"{path.name}: not a regular file")
    return absolute


def check_size(name: str, width: int, height: int, max_pixels: int) -> None:
    """Refuse a declared size above ``max_pixels`` (``too-large``)."""
    if width * height > max_pixels:
        raise RasterRefused("too-large", f"{name}: {width}x{height} px is more than "
                            f"input.max_pixels ({max_pixels})")


def open_raster(path: Path, drivers: Sequence[str] = DEFAULT_DRIVERS,
                max_pixels: int | None = None) -> DatasetReader:
    """Open ``path`` for reading with GDAL restricted to ``drivers``; raise ``RasterRefused``.

    Call under ``rasterio.Env(**SAFE_GDAL)`` and read under it too.
    """
    path = check_local_file(Path(path))
    allowed = list(dict.fromkeys(drivers))
    kind = sniff(path)
    if kind == "tiff" and not TIFF_DRIVERS & set(allowed):
        raise RasterRefused("format", f"{path.name}: GeoTIFF is not in input.drivers")
    if kind == "xml":
        if "VRT" not in allowed:
            raise RasterRefused("format", f"{path.name}: XML (VRT, WMS…) is not an accepted "
                                "format (input.drivers)")
        check_vrt(path, allowed)
    for picture, driver in (("png", "PNG"), ("jpeg", "JPEG")):
        if kind == picture and driver not in allowed:
            raise RasterRefused("format", f"{path.name}: {driver} is not in input.drivers")
    gdal_drivers = list(dict.fromkeys("GTiff" if d == "COG" else d for d in allowed))
    # rasterio takes one driver (GDAL's allowed_drivers=[driver]): the sniffed format's,
    # or each other allowed one in turn for a format not sniffed; never VRT then (GDAL
    # identifies a VRT by "<VRTDataset" anywhere in its first KB, unchecked here).
    candidates = {"tiff": ["GTiff"], "xml": ["VRT"], "png": ["PNG"],
                  "jpeg": ["JPEG"]}.get(kind, [d for d in gdal_drivers if d != "VRT"])
    ds = None
    error: Exception | None = None
    for driver in candidates:
        try:
            ds = rasterio.open(path, driver=driver)
            break
        except (RasterioError, OSError) as exc:
            error = exc
    if ds is None:
        if error is None:
            raise RasterRefused("format", f"{path.name}: not a format in input.drivers")
        raise RasterRefused("unreadable", f"{path.name} is not a readable raster: {error}")
    try:
        if ds.driver not in gdal_drivers:  # belt and braces: GDAL honoured the list
            raise RasterRefused("format", f"{path.name}: opened as {ds.driver}, not allowed")
        if max_pixels is not None:
            check_size(path.name, ds.width, ds.height, max_pixels)
    except BaseException:
        ds.close()
        raise
    return ds


def open_remote_raster(gdal_path: str, name: str, max_pixels: int | None = None
                       ) -> DatasetReader:
    """Open a ``/vsicurl/`` or ``/vsis3/`` object with the GeoTIFF driver alone (a COG, or
    any tiled GeoTIFF); raise ``RasterRefused``. No VRT, no other driver, whatever the
    object's bytes are: a reference format never gets to send requests of its own."""
    if not gdal_path.startswith(("/vsicurl/", "/vsis3/")):
        raise RasterRefused("format", f"{name}: not a remote object")
    try:
        ds = rasterio.open(gdal_path, driver="GTiff")
    except (RasterioError, OSError) as exc:
        raise RasterRefused("unreadable", f"{name} is not a readable GeoTIFF: {exc}") from exc
    try:
        if ds.driver != "GTiff":
            raise RasterRefused("format", f"{name}: opened as {ds.driver}, not allowed")
        if max_pixels is not None:
            check_size(name, ds.width, ds.height, max_pixels)
    except BaseException:
        ds.close()
        raise
    return ds


def check_vrt(path: Path, drivers: Sequence[str]) -> None:
    """Refuse a VRT that reads anything but TIFF files inside its own directory tree."""
    if path.stat().st_size > MAX_VRT_BYTES:
        raise RasterRefused("format", f"{path.name}: VRT larger than {MAX_VRT_BYTES} bytes")
    try:
        root = ET.fromstring(path.read_bytes())
    except ET.ParseError as exc:
        raise RasterRefused("format", f"{path.name}: not well-formed XML: {exc}") from exc
    if not isinstance(root.tag, str) or root.tag.lower() != "vrtdataset":
        raise RasterRefused("format", f"{path.name}: <{root.tag}> is not a VRTDataset")
    tree = Path(os.path.realpath(path.parent))
    for el in root.iter():
        tag = el.tag.lower() if isinstance(el.tag, str) else ""
        if tag in _CODE_TAGS:
            raise RasterRefused("format", f"{path.name}: VRT pixel-function code")
        if tag not in _SOURCE_TAGS:
            continue
        text = (el.text or "").strip()
        if not text or text.startswith("<") or _not_a_path(text):
            raise RasterRefused("format", f"{path.name}: VRT source {text[:80]!r} is not a "
                                "local file")
        attrs = {k.lower(): v for k, v in el.attrib.items()}
        relative = attrs.get("relativetovrt", "0").strip() == "1"
        if not relative and not os.path.isabs(text):
            raise RasterRefused("format", f"{path.name}: VRT source {text[:80]!r} is neither "
                                "absolute nor relative to the VRT")
        source = Path(os.path.realpath(path.parent / text if relative else text))
        if not source.is_relative_to(tree) or not source.is_file():
            raise RasterRefused("format", f"{path.name}: VRT source {text[:80]!r} is outside "
                                "the VRT's directory or missing")
        if sniff(source) != "tiff" or not TIFF_DRIVERS & set(drivers):
            raise RasterRefused("format", f"{path.name}: VRT source {text[:80]!r} is not a "
                                "GeoTIFF")
