"""The real thing: a mosaic of held-out UC Merced chips through a trained multi-label bundle.

64 chips the bundle never trained on (neither its training nor its validation split, read
from the run's ``split.json`` beside the bundle) are laid 8 × 8 into one 2048² px GeoTIFF
at 0.3 m. Each chip's 17 labels are the truth of its ground, so a label's true share of the
scene is the share of chips that hold it. ``process_scene`` must report every label's
share within ``TOLERANCE`` of that truth (per label: 5 of 64 chips; mean absolute error
below ``MEAN_TOLERANCE``), and write the per-label COG with one named band per label.

Needs ``../shared/data/ucm`` and the bundle that ``benchmarks/multilabel_ucm.py`` trains
(``TERRATILE_UCM_BUNDLE``, default ``/work/runs/ucm_ml2/bundle``); skips without them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image
from rasterio.transform import Affine

from appliance.config import Settings
from appliance.contract.bundle import load_bundle
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.scene.pipeline import process_scene
from tests.conftest import shared_data

BUNDLE = Path(os.environ.get("TERRATILE_UCM_BUNDLE", "/work/runs/ucm_ml2/bundle"))
GRID = 8
CHIP = 256
TOLERANCE = 0.10
MEAN_TOLERANCE = 0.03


def held_out_chips(ucm: Path) -> list[tuple[Path, list[str]]]:
    """Seeded 64 chips of labels.csv that the bundle's run neither trained nor validated on."""
    split_file = BUNDLE.parent / "split.json"
    if not (BUNDLE / "manifest.json").is_file() or not split_file.is_file():
        pytest.skip(f"no trained UC Merced bundle with its split at {BUNDLE} (set "
                    "TERRATILE_UCM_BUNDLE, or train one with benchmarks/multilabel_ucm.py)")
    split = json.loads(split_file.read_text())
    seen = {Path(e["path"]).resolve() for part in ("train", "val") for e in split[part]}
    rows = [line.split(",", 1) for line in (ucm / "labels.csv").read_text().splitlines()[1:]]
    unseen = [((ucm / p).resolve(), labels.strip().split("|")) for p, labels in rows
              if (ucm / p).resolve() not in seen]
    assert len(unseen) >= GRID * GRID, "the run saw almost every chip: nothing held out"
    pick = np.random.default_rng(15).permutation(len(unseen))[:GRID * GRID]
    return [unseen[i] for i in pick]


def write_mosaic(path: Path, chips: list[tuple[Path, list[str]]]) -> None:
    side = GRID * CHIP
    with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3,
                       dtype="uint8", crs="EPSG:32611", tiled=True, blockxsize=256,
                       blockysize=256,
                       transform=Affine(0.3, 0.0, 380000.0, 0.0, -0.3, 3760000.0)) as dst:
        for n, (chip, _) in enumerate(chips):
            r, c = divmod(n, GRID)
            image = Image.open(chip).convert("RGB")
            assert image.size == (CHIP, CHIP), chip
            window = rasterio.windows.Window(c * CHIP, r * CHIP, CHIP, CHIP)
            dst.write(np.asarray(image).transpose(2, 0, 1), window=window)


def test_label_shares_of_a_real_mosaic_match_its_chips(tmp_path: Path) -> None:
    ucm = shared_data() / "ucm"
    if not (ucm / "labels.csv").is_file():
        pytest.skip(f"{ucm}/labels.csv not found: this test needs the UC Merced chips")
    chips = held_out_chips(ucm)
    scene = tmp_path / "mosaic.tif"
    write_mosaic(scene, chips)
    bundle = load_bundle(BUNDLE)
    names = bundle.manifest.class_names
    truth = {n: sum(n in labels for _, labels in chips) / len(chips) for n in names}
    runtime = ModelRuntime(bundle, ProviderPlan(providers=("cpu",)))
    settings = Settings.model_validate({"model": {"providers": ["cpu"]},
                                        "tiling": {"scales": [CHIP], "batch_size": 16}})
    out = process_scene(scene, "0f" * 32, tmp_path / "out", runtime, settings)
    assert out.labels is not None
    got = {n: out.labels[n].fraction for n in names}
    errors = {n: abs(got[n] - truth[n]) for n in names}
    report = {n: (round(truth[n], 3), round(got[n], 3)) for n in names}
    print("label: (true share, reported share)", report)
    assert max(errors.values()) <= TOLERANCE, report
    assert float(np.mean(list(errors.values()))) <= MEAN_TOLERANCE, report
    assert truth["cars"] > 0.2 and got["cars"] > 0.2  # what an arg-max map reports as ~0
    with rasterio.open(out.outputs["labels"]) as ds:
        assert ds.count == len(names) and list(ds.descriptions) == names
        assert ds.shape == (GRID, GRID)
