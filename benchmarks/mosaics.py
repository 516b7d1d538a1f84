"""Accuracy of the scene pipeline on AID mosaics: what the tile reader does to the map.

The images of the bundle's held-out split (``split.json`` beside its run, 480 AID images of
150 px) are laid out as 3×4 GeoTIFF mosaics (one image per 150-px cell, 40 scenes) and go
through ``process_scene`` under two tilings: one window per cell at the cell's size
(150 → 128 px: shrinking) and three co-centred windows (75, 150, 300 px: enlarging, near
size, shrinking; edge windows shifted inside the scene). The figure is the overall accuracy
of the per-cell labels against the image each cell holds.

Run it once per code version to compare readers on the same images, e.g. the current tree
and an older checkout (``PYTHONPATH`` picks the code; the JSON records which, by commit):

    PYTHONPATH=. .venv/bin/python benchmarks/mosaics.py --label opencv-strips
    PYTHONPATH=/path/to/old/checkout .venv/bin/python benchmarks/mosaics.py --label gdal
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.append(str(ROOT))  # after PYTHONPATH: it picks the code measured

import appliance
from appliance.config import load_settings
from appliance.contract.bundle import load_bundle
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.scene.pipeline import process_scene
from benchmarks.adaptation import CELL, COLS, ROWS, read_image, write_mosaics

RESULTS = ROOT / "benchmarks" / "results" / "mosaics.json"
BUNDLE = Path("/work/runs/aid_ft/bundle_renorm")
TILINGS = {"one scale (150)": [150], "three scales (75, 150, 300)": [75, 150, 300]}


def mosaics(split: Path, out: Path) -> list[tuple[Path, np.ndarray]]:
    """GeoTIFF mosaics of the split's held-out images (the adaptation benchmark's writer);
    (path, [ROWS,COLS] class) each."""
    doc = json.loads(split.read_text())
    classes = list(doc["classes"])
    images = [read_image(Path(item["path"])) for item in doc["val"]]
    labels = np.asarray([classes.index(item["labels"][0]) for item in doc["val"]])
    return write_mosaics(images, labels, np.arange(len(images)), out, "mosaic")


def accuracy(runtime: ModelRuntime, scales: list[int], scenes: list[tuple[Path, np.ndarray]],
             work: Path) -> dict[str, Any]:
    settings = load_settings(None, **{
        "model": {"providers": ["cpu"], "warmup": False},
        "input": {"rescale": {"mode": "none"}},
        "tiling": {"scales": scales, "cell": CELL, "batch_size": 12, "segments": "none"},
        "retrieval": {"enabled": False}, "mqtt": {"enabled": False},
    })
    hits = total = 0
    t0 = time.perf_counter()
    for i, (path, truth) in enumerate(scenes):
        cells = process_scene(path, f"{i:064x}", work / f"out{i}", runtime, settings).cells
        hits += int((cells.labels == truth[cells.windows[:, 1] // CELL,
                                           cells.windows[:, 0] // CELL]).sum())
        total += len(cells)
    return {"scales": scales, "cells": total, "overall_accuracy": round(hits / total, 4),
            "seconds": round(time.perf_counter() - t0, 1)}


def code_version() -> dict[str, str]:
    """Which checkout's ``appliance`` ran, and its commit."""
    where = Path(appliance.__file__).resolve().parents[1]
    commit = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    return {"commit": commit}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=BUNDLE)
    ap.add_argument("--split", type=Path, help="split.json (default: beside the bundle)")
    ap.add_argument("--label", required=True, help="Name of this run in the results.")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    split = args.split or args.bundle.parent / "split.json"
    runtime = ModelRuntime(load_bundle(args.bundle), ProviderPlan(providers=("cpu",)))
    with tempfile.TemporaryDirectory(prefix="tt-mosaics-") as tmp:
        scenes = mosaics(split, Path(tmp))
        rows = {name: accuracy(runtime, scales, scenes, Path(tmp))
                for name, scales in TILINGS.items()}
    doc = json.loads(args.out.read_text()) if args.out.is_file() else {
        "benchmark": "mosaics", "bundle": args.bundle.name, "images": len(scenes) * ROWS * COLS,
        "mosaic": {"rows": ROWS, "cols": COLS, "cell_px": CELL}, "runs": {}}
    doc["runs"][args.label] = {**code_version(), "tilings": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["runs"][args.label], indent=2))


if __name__ == "__main__":
    main()
