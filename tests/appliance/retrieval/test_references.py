"""Reference images: one entry per file, labelled by folder, replaced when added again."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from appliance.config import InputConfig, RetrievalConfig
from appliance.contract.bundle import load_bundle, sha256_file
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.retrieval.entry_log import REFERENCE_PREFIX
from appliance.retrieval.index import TileIndex
from appliance.retrieval.references import add_reference_images
from tests.helpers.colour_bundle import EMBED_DIM, PURE


@pytest.fixture(scope="module")
def runtime(colour_bundle: Path) -> ModelRuntime:
    return ModelRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cpu",)))


def test_folder_labels_classes_and_replacement(tmp_path: Path, runtime: ModelRuntime) -> None:
    refs = tmp_path / "refs"
    for folder, colour in [("Water", PURE["water"]), ("harbour", PURE["urban"])]:
        (refs / folder).mkdir(parents=True)
        Image.new("RGB", (40, 40), colour).save(refs / folder / "a.png")
    Image.new("RGB", (40, 40), PURE["vegetation"]).save(refs / "top.png")
    (refs / "harbour" / "copy.png").write_bytes((refs / "harbour" / "a.png").read_bytes())
    (refs / "Water" / "broken.jpg").write_bytes(b"not a jpeg")
    (refs / "notes.txt").write_text("not an image")
    index = TileIndex(tmp_path / "state", RetrievalConfig(), EMBED_DIM)
    added, skipped = add_reference_images(refs, index, runtime, InputConfig())
    assert added == 3 and len(skipped) == 2
    assert any("copy.png: duplicate" in s for s in skipped)
    assert any("broken.jpg: unreadable image" in s for s in skipped)
    by_source = {h.entry.source: h.entry for h in index.search(index.vector(1), 10)}
    assert set(by_source) == {"Water/a.png", "harbour/a.png", "top.png"}
    water = by_source["Water/a.png"]
    assert water.class_name == "water" and water.label == "Water"  # the class, case-insensitive
    harbour = by_source["harbour/a.png"]
    assert harbour.class_name == "urban" and harbour.label == "harbour"  # not a class: predicted
    assert by_source["top.png"].label is None and by_source["top.png"].class_name == "vegetation"
    assert water.scene_id == REFERENCE_PREFIX + sha256_file(refs / "Water" / "a.png")
    assert add_reference_images(refs, index, runtime, InputConfig())[0] == 3
    assert index.count() == 3  # added again: replaced, not duplicated
