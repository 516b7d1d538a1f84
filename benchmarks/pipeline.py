"""Scene pipeline benchmark: overhead over raw onnxruntime, and peak memory vs scene size.

1. **Overhead.** Synthetic 4-band uint16 scenes (band selection 3,2,1, percentile
   stretch; 1024² and 4096² by default) go through ``process_scene``; the same tiles,
   pre-extracted in the same batches, go through ``runtime.infer`` alone. Target
   ``scene / raw`` ≤ 1.05: reading, fusion and outputs should hide behind inference. Scene
   and raw runs alternate; ``ratio`` is the median of the per-pair ratios (adjacent runs
   see the same load on a shared machine), ``ratio_best_of`` is best scene over best raw.
   The bundle is ``--bundle``, else the AID bundle at ``/work/runs/aid_ft/bundle_renorm`` when
   it exists, else the colour test bundle (whose "backbone" is a global average pool, so
   there the ratio measures pure pipeline cost).
2. **Peak RSS.** Scenes of 1024², 4096² and 10980² px (4-band uint16, tiled, written in
   row strips so the generator never holds a scene either) are each processed in a fresh
   subprocess, which reports its peak RSS (``VmHWM``) before (model loaded) and after.
   Target: flat, under 1.5 GB. To keep the run short, a scene uses a cell of at least
   ``ceil(side / sqrt(--max-cells))`` px (so ≤ ``--max-cells`` cells); the windows stay
   the bundle's scales, so each tile costs the same as at the default cell.
3. **Full grid.** The same scenes on the full default grid (cell 56, windows 56/112/224,
   e.g. 38k cells and 115k tiles for 10980²) with the colour bundle, whose model is
   nearly free: the pipeline's own time and memory when nothing hides it.
4. **Throughput.** The largest scene on the default grid with the benchmarked bundle:
   seconds per scene and scenes per hour on this machine.

    .venv/bin/python benchmarks/pipeline.py [--bundle DIR] [--sizes 1024 4096 10980]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.config import Settings
from appliance.contract.bundle import BundleError, load_bundle
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.scene.pipeline import process_scene
from appliance.scene.raster import open_scene
from appliance.scene.tiling import CellGrid, iter_batches
from tests.helpers.colour_bundle import build_colour_bundle
from tests.helpers.scenes import quarters, write_scene

RESULTS = ROOT / "benchmarks" / "results" / "pipeline.json"
REAL_BUNDLE = Path("/work/runs/aid_ft/bundle_renorm")
GID_SCALES = (56, 112, 224)


def rss_mb() -> float:
    """Peak resident set size of this process so far, MiB.

    ``VmHWM`` from /proc (per address space, so not inherited from the parent across
    fork+exec as ``ru_maxrss`` is); ``ru_maxrss`` where /proc is missing.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pick_bundle(arg: Path | None, tmp: Path) -> tuple[Path, str]:
    """The bundle to benchmark and a word on where it came from."""
    if arg is not None:
        load_bundle(arg)
        return arg, "given"
    try:
        load_bundle(REAL_BUNDLE)
        return REAL_BUNDLE, "torch-exported (aid_ft)"
    except BundleError:
        return build_colour_bundle(tmp / "colour"), "colour test bundle (no torch bundle found)"


def make_settings(scales: list[int], cell: int, batch: int) -> Settings:
    return Settings.model_validate({
        "model": {"providers": ["cpu"]}, "input": {"bands": [3, 2, 1]},
        "tiling": {"scales": scales, "cell": cell, "batch_size": batch},
    })


def make_scene(path: Path, side: int) -> Path:
    return write_scene(path, bands=4, dtype="uint16", gain=40, offset=300, band_order=(2, 1, 0),
                       size=(side, side), layout=quarters(side, side), noise=8)


def overhead(bundle: Path, tmp: Path, side: int, batch: int, repeats: int) -> dict[str, Any]:
    """Scene time vs raw ``runtime.infer`` on the same tiles in the same batches.

    Scene and raw runs alternate, so slow phases of a shared machine hit both alike.
    """
    runtime = ModelRuntime(load_bundle(bundle), ProviderPlan(providers=("cpu",)))
    runtime.warmup(batch)
    scales = list(runtime.manifest.scales)
    settings = make_settings(scales, min(scales), batch)
    scene_path = make_scene(tmp / f"overhead_{side}.tif", side)
    with open_scene(scene_path, settings.input, runtime.manifest.input) as scene:
        cell = settings.tiling.for_bundle(scales).cell_size
        grid = CellGrid(scene.width, scene.height, cell, tuple(scales))
        cells = np.flatnonzero(grid.valid(scene, settings.tiling.nodata_fraction))
        batches = [b.tiles for b in iter_batches(scene, grid, cells, runtime.input_size, batch)]
    scene_times, raw_times, outcome = [], [], None
    for i in range(repeats):
        t0 = time.perf_counter()
        outcome = process_scene(scene_path, f"{i:064x}", tmp / f"out{i}", runtime, settings)
        scene_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for tiles in batches:
            runtime.infer(tiles)
        raw_times.append(time.perf_counter() - t0)
    assert outcome is not None and outcome.tiles == sum(len(b) for b in batches)
    pairs = [t / r for t, r in zip(scene_times, raw_times, strict=True)]
    return {
        "scene_px": [side, side], "scales": scales, "cell": min(scales),
        "input_size": runtime.input_size, "batch_size": batch,
        "tiles": outcome.tiles, "scene_seconds": round(min(scene_times), 3),
        "raw_onnxruntime_seconds": round(min(raw_times), 3),
        "ratio": round(float(np.median(pairs)), 3),
        "ratio_best_of": round(min(scene_times) / min(raw_times), 3),
        "ratio_pairs": [round(r, 3) for r in pairs],
        "scene_seconds_all": [round(t, 3) for t in scene_times],
        "raw_seconds_all": [round(t, 3) for t in raw_times],
        "last_scene_timings": outcome.timings,
    }


def child(scene: Path, bundle: Path, scales: list[int], cell: int, batch: int) -> None:
    """Subprocess body: load the model, process one scene, print peak RSS as JSON."""
    runtime = ModelRuntime(load_bundle(bundle), ProviderPlan(providers=("cpu",)))
    runtime.warmup(batch)
    before = rss_mb()
    settings = make_settings(scales, cell, batch)
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        outcome = process_scene(scene, "0" * 64, Path(out), runtime, settings)
        seconds = time.perf_counter() - t0
    print(json.dumps({"rss_model_loaded_mb": round(before, 1), "peak_rss_mb": round(rss_mb(), 1),
                      "seconds": round(seconds, 2), "cells": len(outcome.cells),
                      "tiles": outcome.tiles, "timings": outcome.timings}))


def memory(bundle: Path, scenes: dict[int, Path], scales: list[int], batch: int,
           max_cells: int | None) -> list[dict[str, Any]]:
    """Peak RSS per scene size, each scene in a fresh subprocess."""
    rows = []
    for side, path in scenes.items():
        cell = min(scales)
        if max_cells is not None:
            cell = max(cell, math.ceil(side / math.sqrt(max_cells)))
        proc = subprocess.run(
            [sys.executable, __file__, "--child", str(path), "--bundle", str(bundle),
             "--scales", *map(str, scales), "--cell", str(cell), "--batch", str(batch)],
            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append({"scene_px": [side, side], "file_mb": round(path.stat().st_size / 2**20, 1),
                     "scales": scales, "cell": cell, **result})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 10980])
    ap.add_argument("--overhead-sizes", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--no-throughput", action="store_true",
                    help="Skip the largest scene on the default grid with the bundle.")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-cells", type=int, default=3000)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--cell", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--scales", type=int, nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.bundle, args.scales, args.cell, args.batch)
        return
    with tempfile.TemporaryDirectory(prefix="tt-bench-") as tmpdir:
        tmp = Path(tmpdir)
        bundle, origin = pick_bundle(args.bundle, tmp)
        manifest = load_bundle(bundle).manifest
        print(f"bundle: {bundle} ({origin})", flush=True)
        over = []
        for side in args.overhead_sizes:
            over.append(overhead(bundle, tmp, side, args.batch, args.repeats))
            print(json.dumps(over[-1]), flush=True)
        scenes = {}
        for side in args.sizes:
            t0 = time.perf_counter()
            scenes[side] = make_scene(tmp / f"scene_{side}.tif", side)
            print(f"wrote {side}² scene in {time.perf_counter() - t0:.1f}s", flush=True)
        mem = memory(bundle, scenes, list(manifest.scales), args.batch, args.max_cells)
        # The full default grid (cell 56, windows 56/112/224) of every size, with the colour
        # bundle: its model is nearly free, so this is the pipeline's own memory and time.
        colour = bundle if origin.startswith("colour") else build_colour_bundle(tmp / "colour")
        full = memory(colour, scenes, list(GID_SCALES), args.batch, None)
        throughput = None
        if not args.no_throughput:
            largest = max(scenes)
            (row,) = memory(bundle, {largest: scenes[largest]}, list(manifest.scales),
                            args.batch, None)
            throughput = {**row, "scenes_per_hour": round(3600 / row["seconds"], 1)}
    result = {
        "benchmark": "pipeline",
        "bundle": {"path": str(bundle), "origin": origin, "name": manifest.name,
                   "backbone": manifest.backbone, "input_size": manifest.input.size,
                   "scales": manifest.scales},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_end": os.getloadavg()},
        "providers": ["cpu"],
        "overhead": over,
        "memory": mem,
        "memory_full_grid": full,
        "throughput_default_grid": throughput,
        "targets": {"ratio_max": 1.05, "peak_rss_mb_max": 1536},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
