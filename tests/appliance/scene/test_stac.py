"""STAC items and the results catalog, validated offline against the official JSON Schemas
(STAC 1.1.0 core from pystac, the extensions vendored beside this test)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pystac
import pytest
from pystac.validation import JsonSchemaSTACValidator, validate_dict

from appliance.config import Settings
from appliance.contract.bundle import load_bundle
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.scene.pipeline import SceneOutcome, process_scene
from appliance.scene.stac import CATALOG, acquisition_time
from tests.helpers.scenes import quarters, write_scene

SCHEMAS = Path(__file__).parent / "stac_schemas"
URIS = {
    "projection-v2.0.0.json": "https://stac-extensions.github.io/projection/v2.0.0/schema.json",
    "raster-v1.1.0.json": "https://stac-extensions.github.io/raster/v1.1.0/schema.json",
    "classification-v1.1.0.json":
        "https://stac-extensions.github.io/classification/v1.1.0/schema.json",
    "file-v2.1.0.json": "https://stac-extensions.github.io/file/v2.1.0/schema.json",
}


class _Offline(pystac.StacIO):
    """Reads local files only: a schema the tests did not vendor fails loudly."""

    def read_text(self, source: Any, *args: Any, **kwargs: Any) -> str:
        href = str(source)
        if "://" in href:
            raise AssertionError(f"validation tried to fetch {href}")
        return Path(href).read_text()

    def write_text(self, dest: Any, txt: str, *args: Any, **kwargs: Any) -> None:
        raise AssertionError("no writes")


@pytest.fixture(scope="module")
def validate() -> Iterator[Any]:
    validator = JsonSchemaSTACValidator()
    for name, uri in URIS.items():
        validator.schema_cache[uri] = json.loads((SCHEMAS / name).read_text())
    before = pystac.StacIO.default()
    pystac.validation.set_validator(validator)
    pystac.StacIO.set_default(_Offline)
    yield lambda doc, href: validate_dict(doc, href=str(href))
    pystac.StacIO.set_default(lambda: before)
    pystac.validation.set_validator(JsonSchemaSTACValidator())


@pytest.fixture(scope="module")
def runtime(colour_bundle: Path) -> ModelRuntime:
    return ModelRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cpu",)))


def run(scene: Path, runtime: ModelRuntime, results: Path, sid: str,
        **tiling: Any) -> SceneOutcome:
    settings = Settings.model_validate({"model": {"providers": ["cpu"]}, "node_id": "box-1",
                                        "tiling": {"scales": [16, 32], **tiling}})
    return process_scene(scene, sid, results / sid, runtime, settings)


def test_item_is_valid_stac_with_current_extensions(
        tmp_path: Path, runtime: ModelRuntime, validate: Any) -> None:
    scene = write_scene(tmp_path / "s.tif", size=(128, 128), layout=quarters(128, 128),
                        tags={"TIFFTAG_DATETIME": "2024:06:01 10:30:00"})
    out = run(scene, runtime, tmp_path / "results", "ab" * 32, segments="slic")
    item_path = Path(out.outputs["stac"])
    doc = json.loads(item_path.read_text())
    schemas = validate(doc, item_path)
    assert set(URIS.values()) <= set(schemas)  # every extension was checked, offline
    props = doc["properties"]
    assert props["datetime"] == "2024-06-01T10:30:00Z"
    assert props["terratile:datetime_source"] == "tag"
    assert props["proj:code"] == "EPSG:32633" and "proj:epsg" not in props
    landuse = doc["assets"]["landuse"]
    assert "nodata" not in landuse and landuse["raster:bands"][0]["nodata"] == 255
    classes = landuse["classification:classes"]
    assert [c["description"] for c in classes] == ["Urban", "Vegetation", "Water"]
    assert landuse["file:checksum"].startswith("1220") and landuse["file:size"] > 0
    assert doc["assets"]["confidence"]["raster:bands"][0]["unit"] == "%"
    assert doc["assets"]["hybrid"]["classification:classes"] == classes
    links = {link["rel"]: link["href"] for link in doc["links"]}
    assert links["self"] == str(item_path.resolve())
    assert links["root"] == links["parent"] == "../catalog.json"
    assert "derived_from" not in links
    # the validation bites: a class without its description is invalid STAC
    del doc["assets"]["landuse"]["classification:classes"][0]["description"]
    with pytest.raises(pystac.STACValidationError):
        validate(doc, item_path)


def test_catalog_links_every_scene_and_validates(
        tmp_path: Path, runtime: ModelRuntime, validate: Any) -> None:
    results = tmp_path / "results"
    a = run(write_scene(tmp_path / "a.tif", size=(64, 64)), runtime, results, "a" * 64)
    b = run(write_scene(tmp_path / "b.tif", size=(64, 64), seed=1, noise=5), runtime, results,
            "b" * 64)
    catalog = results / CATALOG
    doc = json.loads(catalog.read_text())
    validate(doc, catalog)
    items = {link["href"]: link["title"] for link in doc["links"] if link["rel"] == "item"}
    assert items == {f"./{a.scene_id}/item.json": "a.tif", f"./{b.scene_id}/item.json": "b.tif"}
    # reprocessing a scene replaces its link; a removed scene folder drops out
    run(write_scene(tmp_path / "a.tif", size=(64, 64)), runtime, results, "a" * 64)
    for f in (results / b.scene_id).iterdir():
        f.unlink()
    (results / b.scene_id).rmdir()
    run(write_scene(tmp_path / "c.tif", size=(64, 64)), runtime, results, "c" * 64)
    doc = json.loads(catalog.read_text())
    hrefs = sorted(link["href"] for link in doc["links"] if link["rel"] == "item")
    assert hrefs == [f"./{'a' * 64}/item.json", f"./{'c' * 64}/item.json"]
    # pystac itself walks from the catalog to every item
    opened = pystac.Catalog.from_file(str(catalog), stac_io=pystac.StacIO.default())
    assert sorted(i.id for i in opened.get_items()) == ["a" * 64, "c" * 64]


def test_a_stac_item_beside_the_scene_gives_datetime_and_derived_from(
        tmp_path: Path, runtime: ModelRuntime, validate: Any) -> None:
    scene = write_scene(tmp_path / "s2.tif", size=(64, 64))
    source = {"type": "Feature", "stac_version": "1.0.0", "id": "S2B_T33", "properties":
              {"datetime": "2023-08-14T10:05:59.024Z"}, "geometry": None, "links": [],
              "assets": {}}
    (tmp_path / "s2.json").write_text(json.dumps(source))
    out = run(scene, runtime, tmp_path / "results", "d" * 64)
    doc = json.loads(Path(out.outputs["stac"]).read_text())
    validate(doc, out.outputs["stac"])
    assert doc["properties"]["datetime"] == "2023-08-14T10:05:59.024000Z"
    assert doc["properties"]["terratile:datetime_source"] == "sidecar"
    link = next(link for link in doc["links"] if link["rel"] == "derived_from")
    copy = Path(out.outputs["stac"]).parent / link["href"]
    assert json.loads(copy.read_text())["id"] == "S2B_T33"
    assert out.acquired.source == "sidecar"


def test_without_an_acquisition_time_the_processing_time_is_marked() -> None:
    from datetime import datetime, timezone

    now = datetime(2026, 1, 2, tzinfo=timezone.utc)
    acq = acquisition_time({}, None, now)
    assert acq.datetime == now and acq.source == "processing"
    assert acquisition_time({"ACQUISITIONDATETIME": "2021-03-04T05:06:07Z",
                             "TIFFTAG_DATETIME": "2020:01:01 00:00:00"}, None,
                            now).iso == "2021-03-04T05:06:07Z"
    assert acquisition_time({"TIFFTAG_DATETIME": "not a time"}, None, now).source == (
        "processing")
