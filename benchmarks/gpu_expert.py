"""GPU path of a self-adapted bundle: a routed expert with its own re-normalised backbone.

Builds, from a real bundle with ``layer_stats.npz`` (default: the AID EfficientNet-Lite0
bundle carried in ``.gpu/bundle``), the version an input step would make for a hazy,
low-contrast sensor (``x ↦ 0.7·x + 60``): an expert whose input spec undoes the map and
whose backbone is re-normalised (``appliance.adapt.renorm``, blend 0.5) on the shifted tiles.
Then, for the CPU and the CUDA plan, it does what the daemon does after a promotion:
``ModelRuntime.open_experts`` with a warm-up (on the adaptation thread), ``adopt`` (on the
main loop), and ``infer`` for both experts. Recorded: the providers each expert's backbone
session really runs on, the open + warm-up seconds, parity of the CUDA plan against the CPU
plan for both experts, and img/s of each expert at one batch size. Never imports torch.

    .venv/bin/python benchmarks/gpu_expert.py [--bundle DIR] [--batch 128]

Results go to ``benchmarks/results/gpu_expert.json`` under the GPU's name (or ``no-gpu``).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.adapt.renorm import renormalise
from appliance.contract.bundle import (
    BACKBONE,
    CLASSIFIER,
    LAYER_STATS,
    Bundle,
    Expert,
    load_bundle,
    seal_bundle,
)
from appliance.contract.layer_stats import LayerStats
from appliance.model.runtime import ModelRuntime, ProviderPlan
from benchmarks.gpu_runtime import (
    AID,
    TILE_CACHE,
    gpu_name,
    load_tiles,
    merge,
    parity,
    pick_bundle,
    timed,
)

RESULTS = ROOT / "benchmarks" / "results" / "gpu_expert.json"
GAIN, OFFSET = 0.7, 60.0  # the other sensor: hazier, less contrast
NAME = "adapted"


def expert_bundle(source: Bundle, shifted: np.ndarray, out: Path) -> Bundle:
    """``source`` plus the expert an input step would add for the shifted sensor."""
    if LAYER_STATS not in source.manifest.files:
        raise SystemExit(f"{source.path}: no {LAYER_STATS}; re-export the bundle")
    shutil.copytree(source.path, out)
    spec = source.manifest.input
    # Undo x ↦ G·x + O in the normalisation: m' = G·m + O·s and σ' = G·σ.
    expert_spec = spec.model_copy(update={
        "mean": [GAIN * m + OFFSET * spec.scale for m in spec.mean],
        "std": [GAIN * s for s in spec.std]})
    renorm = renormalise(source.file(BACKBONE), expert_spec.normalise(shifted),
                         LayerStats.load(source.file(LAYER_STATS)), 0.5, time.monotonic() + 600)
    onnx.save(renorm.model, str(out / f"backbone.{NAME}.onnx"))
    shutil.copyfile(out / CLASSIFIER, out / f"classifier.{NAME}.onnx")
    px = shifted.transpose(0, 2, 3, 1).reshape(-1, shifted.shape[1])
    domain = Expert(name=NAME, mean=px.mean(0).tolist(), std=px.std(0).tolist(),
                    input=expert_spec, classifier=f"classifier.{NAME}.onnx",
                    backbone=f"backbone.{NAME}.onnx")
    manifest = source.manifest.model_copy(update={
        "version": source.version + 1, "parent": source.version, "experts": [domain],
        "files": {**source.manifest.files, domain.classifier: "", f"backbone.{NAME}.onnx": ""}})
    seal_bundle(out, manifest)
    return load_bundle(out)


def run_plan(plan: tuple[str, ...], source: Bundle, adapted: Bundle, tiles: np.ndarray,
             shifted: np.ndarray, batch: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the daemon does after a promotion, on one provider plan."""
    runtime = ModelRuntime(source, ProviderPlan(providers=plan))
    t0 = time.perf_counter()
    experts = runtime.open_experts(adapted, warmup_batch=batch)
    opened = time.perf_counter() - t0
    assert runtime.adopt(adapted, experts)
    outputs = {None: runtime.infer(tiles, None), NAME: runtime.infer(shifted, NAME)}
    rates = {}
    for name, x in ((None, tiles), (NAME, shifted)):
        xb = np.resize(x, (batch, *x.shape[1:])).astype(np.float32)
        rates[name or "source"] = round(batch / timed(partial(runtime.infer, xb, name), 2.0), 1)
    return {"plan": list(plan),
            "backbone_providers": {name or "source": e.backbone.get_providers()[0]
                                   for name, e in experts.items()},
            "open_experts_with_warmup_s": round(opened, 2),
            "infer_img_s": rates}, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None)
    parser.add_argument("--tiles", type=Path, default=TILE_CACHE)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    source = load_bundle(pick_bundle(args.bundle))
    tiles, origin = load_tiles(source, args.tiles, AID, 128)
    lo, hi = source.manifest.input.value_range
    shifted = np.clip(GAIN * tiles + OFFSET, lo, hi).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        adapted = expert_bundle(source, shifted, Path(tmp) / "adapted")
        plans = {"cpu": ("cpu",)}
        label = gpu_name() or "no-gpu"
        if label != "no-gpu":
            plans["cuda"] = ("cuda", "cpu")
        results: dict[str, Any] = {}
        outputs: dict[str, Any] = {}
        for key, plan in plans.items():
            results[key], outputs[key] = run_plan(plan, source, adapted, tiles, shifted,
                                                  args.batch)
        if "cuda" in outputs:
            results["cuda_vs_cpu"] = {name or "source": parity(outputs["cuda"][name],
                                                               outputs["cpu"][name])
                                      for name in (None, NAME)}
        run = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "bundle": source.manifest.name, "tiles": f"{len(tiles)} ({origin})",
               "shift": {"gain": GAIN, "offset": OFFSET}, **results}
    doc = merge(args.out, label, run)
    doc["benchmark"] = "benchmarks/gpu_expert.py"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(run, indent=2))


if __name__ == "__main__":
    main()
