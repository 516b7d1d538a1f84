"""Output writers: ellipsoidal areas, COG maps, GeoJSON, STAC Item, quicklook."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.crs import CRS
from rasterio.transform import from_origin

from appliance.contract.bundle import ClassSpec
from appliance.scene import outputs
from appliance.scene.outputs import (
    NODATA,
    ClassMap,
    cell_areas_m2,
    ellipsoidal_areas,
    stac_item,
    write_confidence,
    write_geojson,
    write_landuse,
    write_quicklook,
)
from tests.helpers.geo import local_area

CLASSES = [ClassSpec(name="urban", colour=(200, 40, 40)),
           ClassSpec(name="water", colour=(40, 40, 200))]
UTM = CRS.from_epsg(32633)




def test_ellipsoidal_area_of_a_degree_cell_at_the_equator() -> None:
    lon = np.array([[0.0, 1.0, 1.0, 0.0]])
    lat = np.array([[0.0, 0.0, 1.0, 1.0]])
    assert ellipsoidal_areas(lon, lat)[0] / 1e6 == pytest.approx(12308.78, rel=1e-4)


def test_geographic_cell_areas_match_local_radii() -> None:
    windows = np.array([[0, 0, 100, 100]])
    t = from_origin(10.0, 45.0, 1e-4, 1e-4)
    area = cell_areas_m2(windows, t, CRS.from_epsg(4326))[0]
    assert area == pytest.approx(local_area(44.995, 0.01, 0.01), rel=1e-4)


def test_utm_cell_areas_are_close_to_planar() -> None:
    windows = np.array([[0, 0, 100, 100], [50, 50, 10, 20]])
    t = from_origin(500000.0, 5000000.0, 10.0, 10.0)
    areas = cell_areas_m2(windows, t, UTM)
    # UTM scale factor 0.9996 on the central meridian: true area = planar / k²
    np.testing.assert_allclose(areas, np.array([1e6, 2e4]) / 0.9996**2, rtol=1e-3)


def test_web_mercator_areas_are_not_inflated() -> None:
    lat = 60.0
    y = 6378137.0 * math.log(math.tan(math.pi / 4 + math.radians(lat) / 2))
    t = from_origin(0.0, y, 10.0, 10.0)
    area = cell_areas_m2(np.array([[0, 0, 100, 100]]), t, CRS.from_epsg(3857))[0]
    assert area == pytest.approx(1e6 * math.cos(math.radians(lat)) ** 2, rel=1e-2)


@pytest.fixture()
def cmap() -> ClassMap:
    labels = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [NODATA, 0, 1, NODATA]], np.uint8)
    conf = np.where(labels == NODATA, NODATA, 87).astype(np.uint8)
    return ClassMap(labels, conf, from_origin(500000.0, 5000000.0, 160.0, 160.0), UTM, CLASSES)


def test_landuse_is_a_cog_with_colours_and_names(tmp_path: Path, cmap: ClassMap) -> None:
    path = tmp_path / "landuse.tif"
    write_landuse(path, cmap.labels, cmap.transform, cmap.crs, cmap.classes)
    with rasterio.open(path) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert ds.profile["tiled"] and ds.overviews(1)
        assert ds.crs == UTM and ds.transform == cmap.transform
        assert ds.nodata == NODATA and ds.dtypes[0] == "uint8"
        assert ds.colormap(1)[0][:3] == (200, 40, 40) and ds.colormap(1)[1][:3] == (40, 40, 200)
        assert ds.tags(1)["CLASS_1"] == "water"
        assert json.loads(ds.tags(1)["CLASSES"]) == ["urban", "water"]
        np.testing.assert_array_equal(ds.read(1), cmap.labels)


def test_tiled_gtiff_fallback_without_cog_driver(
    tmp_path: Path, cmap: ClassMap, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outputs, "has_cog_driver", lambda: False)
    path = tmp_path / "landuse.tif"
    write_landuse(path, cmap.labels, cmap.transform, cmap.crs, cmap.classes)
    with rasterio.open(path) as ds:
        assert ds.profile["tiled"] and ds.overviews(1) == [2]
        assert ds.colormap(1)[1][:3] == (40, 40, 200) and ds.tags(1)["CLASS_0"] == "urban"
        np.testing.assert_array_equal(ds.read(1), cmap.labels)


def test_confidence_map(tmp_path: Path, cmap: ClassMap) -> None:
    path = tmp_path / "confidence.tif"
    write_confidence(path, cmap)
    with rasterio.open(path) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        data = ds.read(1)
    assert data[0, 0] == 87 and data[2, 0] == NODATA


def test_geojson_is_wgs84_polygons_with_classes(tmp_path: Path, cmap: ClassMap) -> None:
    path = tmp_path / "landuse.geojson"
    n = write_geojson(path, cmap)
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == n == 2
    assert {f["properties"]["class"] for f in doc["features"]} == {"urban", "water"}
    lon, lat = np.asarray(doc["features"][0]["geometry"]["coordinates"][0]).T
    assert (lon > 14.9).all() and (lon < 15.1).all() and (lat > 45.0).all() and (lat < 45.2).all()


def test_quicklook_is_a_png_with_legend(tmp_path: Path, cmap: ClassMap) -> None:
    path = tmp_path / "quicklook.png"
    write_quicklook(path, cmap, {"urban": 0.6, "water": 0.4})
    with Image.open(path) as im:
        assert im.format == "PNG"
        w, h = im.size
        assert w > h  # the legend panel sits to the right of the map
        rgb = np.asarray(im.convert("RGB"))
    assert (rgb[5, 5] == (200, 40, 40)).all()


def test_stac_item_fields(tmp_path: Path, cmap: ClassMap) -> None:
    bounds = (500000.0, 4999520.0, 500640.0, 5000000.0)
    item = stac_item(scene_id="abc", source="s.tif", crs=UTM, bounds=bounds,
                     scene_shape=(48, 64), cmap=cmap,
                     outputs={"landuse": tmp_path / "landuse.tif"}, properties={"x": 1})
    assert item["stac_version"] == "1.0.0" and item["type"] == "Feature" and item["id"] == "abc"
    assert any("projection" in e for e in item["stac_extensions"])
    props = item["properties"]
    assert props["proj:epsg"] == 32633 and props["proj:bbox"] == list(bounds)
    assert props["proj:shape"] == [48, 64] and props["datetime"].endswith("Z")
    assert item["assets"]["landuse"]["href"] == "landuse.tif"
    assert item["assets"]["landuse"]["classification:classes"][1]["name"] == "water"
    minx, miny, maxx, maxy = item["bbox"]
    assert 14.9 < minx < maxx < 15.1 and 45.0 < miny < maxy < 45.2
    ring = item["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1]
