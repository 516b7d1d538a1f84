"""Class names and colours where GIS tools look for them, beside a class map.

- ``<map>.tif.aux.xml``: GDAL's own sidecar (PAM) with the band's category names and a
  thematic raster attribute table (value, class, description, red, green, blue). GDAL
  keeps both there for GeoTIFFs in any case; ``gdalinfo`` lists them as ``Categories``,
  and QGIS labels the colour-table entries with them.
- ``<map>.qml``: a QGIS paletted-renderer style (value, colour, label per class) that
  QGIS loads by itself when it opens ``<map>.tif``.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path

from appliance.contract.bundle import ClassSpec
from appliance.contract.durable import atomic_write_text

# GDAL raster attribute table enums (gdal.h): field types and usages.
_GFT_INTEGER, _GFT_STRING = 0, 2
_GFU_GENERIC, _GFU_NAME, _GFU_MINMAX, _GFU_RED, _GFU_GREEN, _GFU_BLUE = 0, 2, 5, 6, 7, 8
_FIELDS = [("Value", _GFT_INTEGER, _GFU_MINMAX), ("Class", _GFT_STRING, _GFU_NAME),
           ("Description", _GFT_STRING, _GFU_GENERIC), ("Red", _GFT_INTEGER, _GFU_RED),
           ("Green", _GFT_INTEGER, _GFU_GREEN), ("Blue", _GFT_INTEGER, _GFU_BLUE)]


def aux_xml(classes: Sequence[ClassSpec], description: str) -> str:
    """The PAM document for a one-band class map."""
    root = ET.Element("PAMDataset")
    band = ET.SubElement(root, "PAMRasterBand", band="1")
    ET.SubElement(band, "Description").text = description
    names = ET.SubElement(band, "CategoryNames")
    for c in classes:
        ET.SubElement(names, "Category").text = c.name
    rat = ET.SubElement(band, "GDALRasterAttributeTable", tableType="thematic")
    for i, (name, kind, usage) in enumerate(_FIELDS):
        field = ET.SubElement(rat, "FieldDefn", index=str(i))
        ET.SubElement(field, "Name").text = name
        ET.SubElement(field, "Type").text = str(kind)
        ET.SubElement(field, "Usage").text = str(usage)
    for k, c in enumerate(classes):
        row = ET.SubElement(rat, "Row", index=str(k))
        for value in (k, c.name, c.description, *c.colour):
            ET.SubElement(row, "F").text = str(value)
    ET.indent(root)
    return ET.tostring(root, encoding="unicode") + "\n"


def qml(classes: Sequence[ClassSpec]) -> str:
    """A QGIS style: the paletted renderer on band 1, one labelled entry per class."""
    root = ET.Element("qgis", version="3.22.16", styleCategories="AllStyleCategories")
    pipe = ET.SubElement(root, "pipe")
    renderer = ET.SubElement(pipe, "rasterrenderer", type="paletted", band="1",
                             opacity="1", alphaBand="-1", nodataColor="")
    ET.SubElement(renderer, "rasterTransparency")
    palette = ET.SubElement(renderer, "colorPalette")
    for k, c in enumerate(classes):
        ET.SubElement(palette, "paletteEntry", value=str(k), color=c.hex, alpha="255",
                      label=c.name)
    ET.SubElement(pipe, "brightnesscontrast", brightness="0", contrast="0", gamma="1")
    ET.SubElement(pipe, "huesaturation", saturation="0", grayscaleMode="0",
                  colorizeOn="0", colorizeStrength="100")
    ET.SubElement(pipe, "rasterresampler", maxOversampling="2")
    ET.SubElement(root, "blendMode").text = "0"
    ET.indent(root)
    return "<!DOCTYPE qgis PUBLIC 'http://mrcc.com/qgis.dtd' 'SYSTEM'>\n" + ET.tostring(
        root, encoding="unicode") + "\n"


def write_class_sidecars(raster: Path, classes: Sequence[ClassSpec], description: str
                         ) -> Path:
    """Write ``<raster>.aux.xml`` and ``<stem>.qml`` beside ``raster``; returns the QML."""
    atomic_write_text(raster.with_name(raster.name + ".aux.xml"), aux_xml(classes, description))
    style = raster.with_suffix(".qml")
    atomic_write_text(style, qml(classes))
    return style
