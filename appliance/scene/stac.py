"""STAC for the results: one Item per scene and one Catalog of every scene on the box.

Built with pystac (STAC 1.1.0) and current extension versions: projection v2.0.0
(``proj:code``, or ``proj:wkt2`` for a CRS without a code), raster v1.1.0 (``nodata``,
data type and unit per band), classification v1.1.0 (every class with value, name,
description and colour hint) and file v2.1.0 (size and sha256 multihash of every asset
written before the item). ``datetime`` is the acquisition time (``acquisition_time``);
when the scene carries none it is the processing time and
``terratile:datetime_source`` says so. Links: ``self`` (absolute), ``root`` and
``parent`` (the results catalog), ``derived_from`` (the scene's own STAC item, when one
came beside it; a copy is kept with the outputs).

The catalog (``<results>/catalog.json``) links every scene folder's ``item.json``; it is
rewritten after every scene (its links read back, the new scene's added, links to removed
folders dropped) under an exclusive lock and replaced atomically, so a reader never sees
half a catalog and two writers never lose each other's scene.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import pystac
from pystac.extensions.classification import Classification, ClassificationExtension
from pystac.extensions.file import FileExtension
from pystac.extensions.projection import ProjectionExtension
from pystac.extensions.raster import DataType, RasterBand, RasterExtension
from rasterio.crs import CRS
from rasterio.transform import Affine

from appliance.contract.bundle import ClassSpec, sha256_file
from appliance.contract.durable import atomic_write_text

CATALOG = "catalog.json"
CATALOG_ID = "terratile-results"
ITEM = "item.json"
SOURCE_ITEM = "source-item.json"
CLASSIFICATION = "https://stac-extensions.github.io/classification/v1.1.0/schema.json"
COG_TYPE = "image/tiff; application=geotiff; profile=cloud-optimized"
JSON_TYPE = "application/json"

DatetimeSource = Literal["tag", "sidecar", "processing"]


@dataclass(frozen=True)
class Acquisition:
    """When the scene was acquired, and where that came from."""

    datetime: datetime
    source: DatetimeSource

    @property
    def iso(self) -> str:
        return self.datetime.isoformat().replace("+00:00", "Z")


def _parse_time(text: str) -> datetime | None:
    """A TIFF (``YYYY:MM:DD HH:MM:SS``) or ISO 8601 time, UTC when it names no zone."""
    text = text.strip()
    tiff = re.fullmatch(r"(\d{4}):(\d{2}):(\d{2})[ T](\d{2}):(\d{2}):(\d{2})", text)
    if tiff:
        text = "{}-{}-{}T{}:{}:{}".format(*tiff.groups())
    try:
        dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def sidecar_item(scene: Path) -> dict[str, Any] | None:
    """The STAC item that came beside the scene (``scene.tif.json`` or ``scene.json``),
    or None; a file there that is not a STAC item is ignored."""
    for candidate in (scene.with_name(scene.name + ".json"), scene.with_suffix(".json")):
        try:
            doc = json.loads(candidate.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict) and doc.get("type") == "Feature" and "stac_version" in doc:
            return doc
    return None


def acquisition_time(tags: dict[str, str], sidecar: dict[str, Any] | None,
                     now: datetime) -> Acquisition:
    """The scene's acquisition time: ``ACQUISITIONDATETIME`` or ``TIFFTAG_DATETIME`` from
    its tags, else the sidecar item's ``datetime``, else ``now`` marked as processing."""
    for key in ("ACQUISITIONDATETIME", "TIFFTAG_DATETIME"):
        if key in tags and (dt := _parse_time(tags[key])) is not None:
            return Acquisition(dt, "tag")
    if sidecar is not None:
        props = sidecar.get("properties") or {}
        for key in ("datetime", "start_datetime"):
            if isinstance(props.get(key), str) and (dt := _parse_time(props[key])):
                return Acquisition(dt, "sidecar")
    return Acquisition(now, "processing")


@dataclass(frozen=True)
class MapGrid:
    """Where an output raster lies: its shape and geotransform, and its pixel size (m)."""

    shape: tuple[int, int]
    transform: Affine
    resolution_m: float | None


@dataclass(frozen=True)
class ItemInputs:
    """Everything a scene's STAC item says, gathered by the pipeline."""

    scene_id: str
    source: str
    crs: CRS
    bounds: tuple[float, float, float, float]
    scene_shape: tuple[int, int]
    scene_transform: Affine
    geometry: dict[str, Any]
    bbox: tuple[float, float, float, float]
    acquisition: Acquisition
    classes: Sequence[ClassSpec]
    nodata: int
    maps: dict[str, MapGrid]  # raster assets (landuse, confidence, hybrid) → their grid
    outputs: dict[str, Path]  # asset key → file (every output but the item itself)
    properties: dict[str, Any]  # terratile:* figures


_ASSETS: dict[str, tuple[str, list[str], str]] = {
    "landuse": (COG_TYPE, ["data"], "Land-use class per cell"),
    "confidence": (COG_TYPE, ["data"], "Fused max probability per cell, percent"),
    "hybrid": (COG_TYPE, ["data"], "Land-use classes on image segments"),
    "summary": (JSON_TYPE, ["metadata"], "Per-class shares and how they were computed"),
    "geojson": ("application/geo+json", ["data"], "Class regions with area and confidence"),
    "quicklook": (pystac.MediaType.PNG, ["overview"], "Map over the scene, with legend"),
    "style": ("text/xml", ["style"], "QGIS style of landuse.tif"),
    "source_item": (pystac.MediaType.JSON, ["metadata"], "The scene's own STAC item"),
}


def _classes(classes: Sequence[ClassSpec]) -> list[Classification]:
    return [Classification.create(value=i, description=c.description, name=c.name,
                                  color_hint=c.hex.lstrip("#").upper())
            for i, c in enumerate(classes)]


def build_item(inputs: ItemInputs, item_path: Path, catalog_path: Path) -> pystac.Item:
    """The scene's STAC item; its asset hrefs are relative to ``item_path``."""
    acq = inputs.acquisition
    props = {"title": inputs.source, "created": datetime.now(timezone.utc).isoformat(),
             "terratile:datetime_source": acq.source, **inputs.properties}
    item = pystac.Item(id=inputs.scene_id, geometry=inputs.geometry, bbox=list(inputs.bbox),
                       datetime=acq.datetime, properties=props)
    proj = ProjectionExtension.ext(item, add_if_missing=True)
    epsg = inputs.crs.to_epsg()
    proj.apply(code=f"EPSG:{epsg}" if epsg else None,
               wkt2=None if epsg else inputs.crs.to_wkt(), bbox=list(inputs.bounds),
               shape=list(inputs.scene_shape), transform=list(inputs.scene_transform)[:6])
    classes = _classes(inputs.classes)
    for key, file in inputs.outputs.items():
        media, roles, title = _ASSETS[key]
        asset = pystac.Asset(href=file.name, media_type=media, roles=roles, title=title)
        item.add_asset(key, asset)
        FileExtension.ext(asset, add_if_missing=True).apply(
            size=file.stat().st_size, checksum="1220" + sha256_file(file))
        grid = inputs.maps.get(key)
        if grid is None:
            continue
        ProjectionExtension.ext(asset).apply(shape=list(grid.shape),
                                             transform=list(grid.transform)[:6])
        band = RasterBand.create(nodata=inputs.nodata, data_type=DataType.UINT8,
                                 spatial_resolution=grid.resolution_m,
                                 unit="%" if key == "confidence" else None)
        RasterExtension.ext(asset, add_if_missing=True).apply([band])
        if key != "confidence":
            ClassificationExtension.ext(asset, add_if_missing=True).apply(classes=classes)
    # classification v1.1.0: the current release of its official schema
    item.stac_extensions = [CLASSIFICATION if "/classification/" in uri else uri
                            for uri in item.stac_extensions]
    root = pystac.Link(pystac.RelType.ROOT, _relative(catalog_path, item_path),
                       media_type=pystac.MediaType.JSON, title="terratile results")
    item.add_link(root)
    item.add_link(pystac.Link(pystac.RelType.PARENT, root.href,
                              media_type=pystac.MediaType.JSON))
    if "source_item" in inputs.outputs:
        item.add_link(pystac.Link(pystac.RelType.DERIVED_FROM,
                                  inputs.outputs["source_item"].name,
                                  media_type=pystac.MediaType.GEOJSON))
    item.add_link(pystac.Link(pystac.RelType.SELF, str(item_path.resolve()),
                              media_type=pystac.MediaType.GEOJSON))
    return item


def _relative(target: Path, start_file: Path) -> str:
    """``target`` relative to the folder of ``start_file`` (both under the results root)."""
    return os.path.relpath(target.resolve(), start_file.resolve().parent)


def item_dict(item: pystac.Item) -> dict[str, Any]:
    """The item as written: hrefs exactly as built (relative assets, absolute self)."""
    return item.to_dict(include_self_link=True, transform_hrefs=False)


def update_catalog(results: Path, node_id: str, added: Path | None = None,
                   title: str | None = None) -> Path:
    """Rewrite ``<results>/catalog.json`` with a link to the item of scene folder ``added``
    (replacing an older one), dropping links whose item is gone; atomic, under a lock."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / CATALOG
    with (results / ".catalog.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        links: dict[str, str | None] = {}
        try:
            for link in json.loads(path.read_text()).get("links", []):
                if link.get("rel") == "item" and isinstance(link.get("href"), str):
                    links[link["href"]] = link.get("title")
        except (OSError, ValueError, AttributeError):
            pass  # no catalog yet (or an unreadable one): rebuilt from this scene on
        if added is not None:
            links[f"./{added.name}/{ITEM}"] = title
        catalog = pystac.Catalog(
            id=CATALOG_ID, title=f"terratile results ({node_id})",
            description=f"Land-use maps of every scene processed by terratile node {node_id}.")
        catalog.add_link(pystac.Link(pystac.RelType.ROOT, f"./{CATALOG}",
                                     media_type=pystac.MediaType.JSON))
        catalog.add_link(pystac.Link(pystac.RelType.SELF, str(path.resolve()),
                                     media_type=pystac.MediaType.JSON))
        for href in sorted(links):
            if (results / href).is_file():
                catalog.add_link(pystac.Link(pystac.RelType.ITEM, href, title=links[href],
                                             media_type=pystac.MediaType.GEOJSON))
        atomic_write_text(path, json.dumps(
            catalog.to_dict(include_self_link=True, transform_hrefs=False), indent=2))
    return path
