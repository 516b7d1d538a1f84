"""Self-adaptation on real data: AID mosaics under sensor shifts, ingested by the daemon's code.

For each condition (no shift, then several realistic sensor shifts) the benchmark builds a
fresh appliance state, installs the fine-tuned AID bundle and streams *adapt* mosaics
through the very objects the daemon uses: ``appliance.scene.pipeline.process_scene`` →
``DriftMonitor.observe`` → ``Adapter.collect``, and, whenever ``Adapter.due`` says so (drift
fired, enough cells, cooled down), the daemon's adaptation job (``AdaptationJobs``): the
adapter proposes, the model host installs the candidate (or the reset version), switches
the runtime to it and tells the drift monitor, as the daemon does. No labels are used
anywhere in that loop.

Target scenes are 3×4 mosaics of AID validation images (the bundle's ``split.json``; never
seen in training), one 150 px image per grid cell: ``tiling.cell = 150`` and
``tiling.scales = [150]``, so each cell's one window is exactly one image, resized to the
network input like the training chips (a second, 75 px scale would look at a quarter of an
image the source head never saw in that form). The validation images are split per class
into an *adapt* half (streamed, 20 scenes) and a *test* half (20 scenes the adaptation never
sees), which gives the target overall accuracy before and after. Source accuracy is the
same test half without shift, before and after, through ``process_scene`` too, so routing
decides which expert each clean scene gets; plus the gate's held-back source-bank figure.
The bundle must be exported with ``layer_stats.npz`` for the re-normalisation to run.

    .venv/bin/python benchmarks/adaptation.py --bundle /work/runs/aid_ft/bundle_renorm \\
        --split /work/runs/aid_ft/split.json

Writes ``benchmarks/results/adaptation.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from PIL import Image, ImageFilter
from rasterio.transform import from_origin

from appliance.adapt.adapter import Adapter
from appliance.adapt.drift import DriftMonitor
from appliance.adapt.job import AdaptationJobs
from appliance.adapt.learning import agreement
from appliance.adapt.lineage import adapted_domain
from appliance.config import Settings, load_settings
from appliance.contract.bundle import CLASSIFIER, load_bundle
from appliance.model.head import read_head
from appliance.model.host import ModelHost
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.model.store import ModelStore
from appliance.scene.pipeline import process_scene

CELL = 150
ROWS, COLS = 3, 4

Shift = Callable[[np.ndarray], np.ndarray]


def _clip(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def colour_cast(img: np.ndarray) -> np.ndarray:
    """Another sensor's white balance: warm gains and offsets per band."""
    return _clip(img.astype(np.float32) * np.array([1.18, 1.0, 0.78]) + np.array([12, 4, -6]))


def gamma_haze(img: np.ndarray) -> np.ndarray:
    """Darker mid-tones (gamma 1.4) under a bluish-white haze veil of 30 %."""
    x = 255 * (img.astype(np.float32) / 255) ** 1.4
    return _clip(0.7 * x + 0.3 * np.array([200, 205, 215]))


def coarse(img: np.ndarray) -> np.ndarray:
    """A sensor with 3× coarser ground sampling, resampled onto the same grid."""
    h, w = img.shape[:2]
    small = Image.fromarray(img).resize((w // 3, h // 3), Image.BILINEAR)
    return np.asarray(small.resize((w, h), Image.BILINEAR))


def sensor(img: np.ndarray) -> np.ndarray:
    """All at once, moderately: colour gains, gamma 1.25, 20 % haze, optical blur."""
    x = np.clip(img.astype(np.float32) * np.array([1.1, 1.0, 0.85]), 0, 255)
    x = 0.8 * 255 * (x / 255) ** 1.25 + 0.2 * 210
    return np.asarray(Image.fromarray(_clip(x)).filter(ImageFilter.GaussianBlur(1.2)))


def no_shift(img: np.ndarray) -> np.ndarray:
    return img


SHIFTS: dict[str, Shift] = {"none": no_shift, "colour_cast": colour_cast,
                            "gamma_haze": gamma_haze, "coarse_resolution": coarse,
                            "sensor_combined": sensor}


def load_split(split: Path, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    doc = json.loads(split.read_text())
    index = {c: i for i, c in enumerate(classes)}
    paths = [Path(e["path"]) for e in doc["val"]]
    labels = np.array([index[e["labels"][0]] for e in doc["val"]])
    return paths, labels


def halves(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class, alternate images into adapt / test (deterministic)."""
    adapt, test = [], []
    for k in np.unique(labels):
        rows = np.flatnonzero(labels == k)
        adapt.extend(rows[::2])
        test.extend(rows[1::2])
    return np.array(adapt), np.array(test)


def read_image(path: Path) -> np.ndarray:
    img = Image.open(path).convert("RGB")
    if img.size != (CELL, CELL):
        img = img.resize((CELL, CELL), Image.BILINEAR)
    return np.asarray(img)


def write_mosaics(images: list[np.ndarray], labels: np.ndarray, order: np.ndarray, out: Path,
                  prefix: str) -> list[tuple[Path, np.ndarray]]:
    """GeoTIFF mosaics of ROWS×COLS images; returns (path, [ROWS,COLS] labels) per scene."""
    out.mkdir(parents=True, exist_ok=True)
    per = ROWS * COLS
    scenes = []
    for s in range(len(order) // per):
        idx = order[s * per:(s + 1) * per]
        mosaic = np.zeros((3, ROWS * CELL, COLS * CELL), np.uint8)
        for j, i in enumerate(idx):
            r, c = divmod(j, COLS)
            tile = images[i].transpose(2, 0, 1)
            mosaic[:, r * CELL:(r + 1) * CELL, c * CELL:(c + 1) * CELL] = tile
        path = out / f"{prefix}-{s:02d}.tif"
        with rasterio.open(path, "w", driver="GTiff", width=COLS * CELL, height=ROWS * CELL,
                           count=3, dtype="uint8", crs="EPSG:32633",
                           transform=from_origin(500_000 + 10_000 * s, 5_000_000, 1.0, 1.0)
                           ) as dst:
            dst.write(mosaic)
        scenes.append((path, labels[idx].reshape(ROWS, COLS)))
    return scenes


# "full": the defaults (a routed expert for the new sensor: input calibrated all the way,
# backbone layers re-normalised half-way, then distilled head steps on it); "no_renorm": the
# expert shares the source backbone (adapt.renorm_blend = 0); "head_only":
# adapt.input_blend = 0, no expert, head steps on the source head (GID's scheme alone).
VARIANTS: dict[str, dict[str, Any]] = {"full": {}, "no_renorm": {"renorm_blend": 0.0},
                                       "head_only": {"input_blend": 0.0}}


def settings_for(state: Path, adapt: dict[str, Any] | None = None) -> Settings:
    return load_settings(None, **{
        "adapt": adapt or {},
        "paths": {"state": str(state / "state"), "inbox": str(state / "inbox"),
                  "results": str(state / "results"), "failed": str(state / "failed")},
        "model": {"providers": ["cpu"], "warmup": False},
        "input": {"rescale": {"mode": "none"}},
        "tiling": {"scales": [CELL], "cell": CELL, "batch_size": 12, "segments": "none"},
        "retrieval": {"enabled": False}, "mqtt": {"enabled": False},
    })


def classify(runtime: ModelRuntime, settings: Settings, scenes: list[tuple[Path, np.ndarray]],
             out: Path) -> tuple[float, float]:
    """Overall accuracy of the pipeline's per-cell labels on labelled mosaics, and the
    fraction of the scenes routed to an adapted expert."""
    hits = total = routed = 0
    for i, (path, truth) in enumerate(scenes):
        outcome = process_scene(path, f"eval-{i}", out / f"eval-{i}", runtime, settings,
                                probe_sharpness=True)
        cells = outcome.cells
        rows = cells.windows[:, 1] // CELL
        cols = cells.windows[:, 0] // CELL
        hits += int((cells.labels == truth[rows, cols]).sum())
        total += len(cells)
        routed += cells.domain is not None
    shutil.rmtree(out, ignore_errors=True)
    return hits / max(total, 1), routed / max(len(scenes), 1)


def bank_holdout_oa(bundle_dir: Path) -> float:
    """Accuracy of the adapted expert's head (the source head if none) on the held-back
    rows of the source bank: the gate's source figure."""
    bundle = load_bundle(bundle_dir)
    bank = bundle.source_bank
    head = read_head(bundle.classifier(adapted_domain(bundle)))
    return agreement(head.logits(bank.features[bank.holdout]), bank.labels[bank.holdout])


def run_condition(name: str, variant: str, shift: Shift, bundle_dir: Path,
                  images: list[np.ndarray], labels: np.ndarray, adapt_order: np.ndarray,
                  test_order: np.ndarray, clean_test: list[tuple[Path, np.ndarray]], work: Path
                  ) -> dict[str, Any]:
    t0 = time.perf_counter()
    root = work / f"{name}-{variant}"
    settings = settings_for(root, VARIANTS[variant])
    store = ModelStore(settings.paths.state / "models")
    store.install(bundle_dir)
    host = ModelHost(store, settings)  # the daemon's owner of the running model
    monitor = DriftMonitor(host.bundle.reference, settings.drift, settings.paths.state)
    host.on_switch(lambda change: monitor.switch_model(change.bundle))
    adapter = Adapter(store, settings.adapt, settings.paths.state, settings.tiling)
    jobs_run = AdaptationJobs(adapter, host, settings.adapt.keep_versions, lambda _r: None)
    shifted = [shift(img) for img in images]
    adapt_scenes = write_mosaics(shifted, labels, adapt_order, root / "scenes", "adapt")
    test_scenes = write_mosaics(shifted, labels, test_order, root / "scenes", "test")
    target_before, _ = classify(host.runtime, settings, test_scenes, root / "eval")
    stream: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
    stream_seconds = 0.0
    for i, (path, _) in enumerate(adapt_scenes):
        t = time.perf_counter()
        outcome = process_scene(path, f"{name}-{i}", root / "results" / str(i), host.runtime,
                                settings, probe_sharpness=True)
        report = monitor.observe(outcome.cells)
        jobs_run.collect(outcome.cells)
        stream_seconds += time.perf_counter() - t
        scene = report.scene
        assert scene is not None, report.skipped
        stream.append({"scene": i, "domain": outcome.cells.domain,
                       "drifting": report.drifting, "fired": report.fired,
                       "psi": round(scene.psi, 4), "mmd": round(scene.mmd, 4),
                       "mean_max_prob": round(scene.mean_max_prob, 4),
                       "ph_max_prob": round(report.window.ph_max_prob, 4),
                       "ph_entropy": round(report.window.ph_entropy, 4)})
        if jobs_run.due(report.drifting):  # the daemon's job, run to the end here
            jobs.append({"scene": i, **jobs_run.run_here(f"drift at scene {i}").as_dict()})
    active = host.bundle
    target_after, target_routed = classify(host.runtime, settings, test_scenes, root / "eval")
    source_after, source_routed = classify(host.runtime, settings, clean_test, root / "eval")
    first_fire = next((s["scene"] for s in stream if s["drifting"]), None)
    return {
        "shift": name, "variant": variant, "target_oa_before": target_before,
        "target_oa_after": target_after, "source_oa_after": source_after,
        "bank_holdout_oa_before": bank_holdout_oa(bundle_dir),
        "bank_holdout_oa_after": bank_holdout_oa(active.path),
        "drift_first_fired_at_scene": first_fire,
        "scenes_drifting": sum(s["drifting"] for s in stream),
        "promotions": sum(j["action"] == "promoted" for j in jobs),
        "active_version": active.version,
        "experts": [d.model_dump(mode="json") for d in active.manifest.experts],
        "target_test_scenes_routed_to_expert": target_routed,
        "clean_test_scenes_routed_to_expert": source_routed,
        "jobs": jobs, "stream": stream,
        "stream_seconds": round(stream_seconds, 2),
        "stream_scenes_per_s": round(len(adapt_scenes) / max(stream_seconds, 1e-9), 3),
        "seconds": round(time.perf_counter() - t0, 2),
        "heads_changed": [name or "source" for name in (None, adapted_domain(active))
                          if active.classifier(name).read_bytes()
                          != (bundle_dir / CLASSIFIER).read_bytes()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("/work/runs/aid_ft/bundle_renorm"))
    parser.add_argument("--split", type=Path, default=Path("/work/runs/aid_ft/split.json"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/adaptation.json"))
    parser.add_argument("--shifts", nargs="*", default=list(SHIFTS))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    args = parser.parse_args()
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="terratile-adapt-bench-"))
    snapshot = work / "bundle"  # a private copy: the exporter may rewrite its bundle meanwhile
    shutil.copytree(args.bundle, snapshot)
    bundle = load_bundle(snapshot)
    paths, labels = load_split(args.split, bundle.manifest.class_names)
    images = [read_image(p) for p in paths]
    adapt_idx, test_idx = halves(labels)
    rng = np.random.default_rng(0)
    adapt_order, test_order = rng.permutation(adapt_idx), rng.permutation(test_idx)
    results: list[dict[str, Any]] = []
    doc = {
        "benchmark": "adaptation", "bundle": str(args.bundle),
        "bundle_name": bundle.manifest.name, "bundle_files": bundle.manifest.files,
        "split": str(args.split),
        "target_images": {"adapt": len(adapt_idx), "test": len(test_idx)},
        "mosaic": {"rows": ROWS, "cols": COLS, "cell_px": CELL, "scales": [CELL]},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "seconds": 0.0, "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        clean_root = work / "clean"
        settings = settings_for(clean_root)
        runtime = ModelRuntime(bundle, ProviderPlan(providers=("cpu",)))
        clean_test = write_mosaics(images, labels, test_order, clean_root / "scenes", "test")
        source_before, _ = classify(runtime, settings, clean_test, clean_root / "eval")
        runs = [(n, v) for v in args.variants for n in args.shifts
                if v == args.variants[0] or n != "none"]
        for name, variant in runs:
            res = run_condition(name, variant, SHIFTS[name], snapshot, images, labels,
                                adapt_order, test_order, clean_test, work)
            cost = source_before - res["target_oa_before"]
            res["source_oa_before"] = source_before
            res["shift_cost"] = cost
            res["recovered_fraction"] = ((res["target_oa_after"] - res["target_oa_before"]) / cost
                                         if cost > 0.005 else None)
            res["source_drop"] = source_before - res["source_oa_after"]
            results.append(res)
            print(json.dumps({k: v for k, v in res.items() if k not in ("jobs", "stream")}),
                  flush=True)
            doc["seconds"] = round(time.perf_counter() - t0, 1)
            args.out.write_text(json.dumps(doc, indent=2) + "\n")  # partial results survive
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out} in {doc['seconds']} s")


if __name__ == "__main__":
    main()
