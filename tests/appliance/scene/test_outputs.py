"""Output writers: ellipsoidal areas, COG maps with GIS sidecars, GeoJSON, quicklook."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.crs import CRS
from rasterio.transform import from_origin

from appliance.contract.bundle import ClassSpec
from appliance.scene import outputs
from appliance.scene.outputs import (
    NODATA,
    ClassMap,
    cell_areas_m2,
    ellipsoidal_areas,
    write_confidence,
    write_geojson,
    write_landuse,
)
from appliance.scene.quicklook import Quicklook, render
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


def gdalinfo(path: Path, *args: str) -> str:
    exe = shutil.which("gdalinfo")
    if exe is None:
        pytest.skip("gdalinfo is not installed (make system-deps installs gdal-bin)")
    return subprocess.run([exe, *args, str(path)], check=True, capture_output=True,
                          text=True).stdout


def test_landuse_is_a_cog_with_colours_and_names(tmp_path: Path, cmap: ClassMap) -> None:
    path = tmp_path / "landuse.tif"
    style = write_landuse(path, cmap.labels, cmap.transform, cmap.crs, cmap.classes)
    with rasterio.open(path) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert ds.profile["tiled"] and ds.overviews(1) == []  # one block: no overviews
        assert ds.crs == UTM and ds.transform == cmap.transform
        assert ds.nodata == NODATA and ds.dtypes[0] == "uint8"
        assert ds.colormap(1)[0][:3] == (200, 40, 40) and ds.colormap(1)[1][:3] == (40, 40, 200)
        assert ds.tags(1)["CLASS_1"] == "water"
        assert json.loads(ds.tags(1)["CLASSES"]) == ["urban", "water"]
        np.testing.assert_array_equal(ds.read(1), cmap.labels)
    assert style == tmp_path / "landuse.qml"


def test_gdal_lists_class_names_as_categories_and_attribute_table(
        tmp_path: Path, cmap: ClassMap) -> None:
    path = tmp_path / "landuse.tif"
    write_landuse(path, cmap.labels, cmap.transform, cmap.crs, cmap.classes)
    band = json.loads(gdalinfo(path, "-json"))["bands"][0]
    assert band["categories"] == ["urban", "water"]
    text = gdalinfo(path)  # GDAL 3.6 prints the attribute table in its text form only
    rat = ET.fromstring(text[text.index("<GDALRasterAttributeTable"):
                             text.index("</GDALRasterAttributeTable>") + 27])
    assert [f.findtext("Name") for f in rat.findall("FieldDefn")][:2] == ["Value", "Class"]
    assert [f.text for f in rat.findall("Row")[1]] == ["1", "water", "Water", "40", "40", "200"]


def test_qml_names_every_class_with_its_colour(tmp_path: Path, cmap: ClassMap) -> None:
    style = write_landuse(tmp_path / "landuse.tif", cmap.labels, cmap.transform, cmap.crs,
                          cmap.classes)
    entries = ET.parse(style).getroot().findall(".//rasterrenderer/colorPalette/paletteEntry")
    assert [(e.get("value"), e.get("label"), e.get("color")) for e in entries] == [
        ("0", "urban", "#c82828"), ("1", "water", "#2828c8")]
    assert ET.parse(style).getroot().find(".//rasterrenderer").get("type") == "paletted"


def test_large_maps_get_overviews(tmp_path: Path) -> None:
    labels = np.zeros((700, 900), np.uint8)
    path = tmp_path / "landuse.tif"
    write_landuse(path, labels, from_origin(500000.0, 5000000.0, 10.0, 10.0), UTM, CLASSES)
    with rasterio.open(path) as ds:
        assert ds.overviews(1) == [2, 4]


def test_tiled_gtiff_fallback_without_cog_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outputs, "has_cog_driver", lambda: False)
    labels = np.tile(np.array([0, 1], np.uint8), (300, 150))
    path = tmp_path / "landuse.tif"
    write_landuse(path, labels, from_origin(500000.0, 5000000.0, 10.0, 10.0), UTM, CLASSES)
    with rasterio.open(path) as ds:
        assert ds.profile["tiled"] and ds.overviews(1) == [2]
        assert ds.colormap(1)[1][:3] == (40, 40, 200) and ds.tags(1)["CLASS_0"] == "urban"
        np.testing.assert_array_equal(ds.read(1), labels)


def test_confidence_map_is_in_percent(tmp_path: Path, cmap: ClassMap) -> None:
    path = tmp_path / "confidence.tif"
    write_confidence(path, cmap)
    with rasterio.open(path) as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        assert ds.units == ("%",)
        data = ds.read(1)
    assert data[0, 0] == 87 and data[2, 0] == NODATA


def test_geojson_polygons_carry_class_area_and_mean_confidence(
        tmp_path: Path, cmap: ClassMap) -> None:
    path = tmp_path / "landuse.geojson"
    conf = cmap.confidence.copy()
    conf[0, 0] = 47  # one urban cell less sure: mean of 47, 87, 87, 87, 87 = 79
    areas = np.full(cmap.labels.shape, 25600.0)  # 160 m cells: 2.56 ha
    n = write_geojson(path, ClassMap(cmap.labels, conf, cmap.transform, cmap.crs, CLASSES),
                      areas)
    doc = json.loads(path.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == n == 2
    props = {f["properties"]["class"]: f["properties"] for f in doc["features"]}
    assert props["urban"]["area_ha"] == pytest.approx(5 * 2.56)
    assert props["urban"]["mean_confidence"] == pytest.approx(0.79)
    assert props["water"]["area_ha"] == pytest.approx(5 * 2.56)
    lon, lat = np.asarray(doc["features"][0]["geometry"]["coordinates"][0]).T
    assert (lon > 14.9).all() and (lon < 15.1).all() and (lat > 45.0).all() and (lat < 45.2).all()


def test_geojson_separates_regions_of_one_class(tmp_path: Path) -> None:
    labels = np.array([[0, 1, 0]], np.uint8)
    cmap = ClassMap(labels, np.full((1, 3), 90, np.uint8),
                    from_origin(500000.0, 5000000.0, 100.0, 100.0), UTM, CLASSES)
    write_geojson(tmp_path / "g.geojson", cmap, np.array([[1e4, 2e4, 3e4]]))
    feats = json.loads((tmp_path / "g.geojson").read_text())["features"]
    assert sorted((f["properties"]["class"], f["properties"]["area_ha"]) for f in feats) == [
        ("urban", 1.0), ("urban", 3.0), ("water", 2.0)]


def test_quicklook_blends_the_map_over_the_scene_with_a_sorted_legend(cmap: ClassMap) -> None:
    backdrop = np.zeros((3, 30, 40), np.uint8)
    backdrop[1] = 255  # a green scene
    q = Quicklook(labels=cmap.labels, classes=CLASSES, fractions={"urban": 0.3, "water": 0.7},
                  backdrop=backdrop, title="s.tif", subtitle="m v1", ground_width_m=640.0)
    image = np.asarray(render(q).convert("RGB")).astype(int)
    w = image.shape[1]
    assert w > 640  # the legend panel sits to the right of the 640 px map
    header = 46
    # an urban cell: red blended over the green backdrop, neither colour alone
    r, g, b = image[header + 20, 20]
    assert r > 80 and g > 80 and b < 60
    # a nodata cell shows the scene itself
    assert tuple(image[header + 400, 80]) == (0, 255, 0)
    legend = image[header:, 641:]
    water_rows = np.flatnonzero((np.abs(legend - (40, 40, 200)).sum(axis=2) < 10).any(axis=1))
    urban_rows = np.flatnonzero((np.abs(legend - (200, 40, 40)).sum(axis=2) < 10).any(axis=1))
    assert water_rows.min() < urban_rows.min()  # 70 % water listed before 30 % urban


def test_quicklook_legend_lists_only_classes_present() -> None:
    many = [ClassSpec(name=f"c{i}", colour=(20 + 7 * i, 100, 100)) for i in range(30)]
    labels = np.zeros((10, 10), np.uint8)
    q = Quicklook(labels=labels, classes=many, fractions={"c0": 1.0}, backdrop=None,
                  title="t", subtitle="s", ground_width_m=None)
    assert render(q).size[1] == 46 + 640  # one legend row: the map sets the height
