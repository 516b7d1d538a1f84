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
from dataclasses import dataclass
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
from appliance.contract.retrieval_metrics import map_at_k
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


@dataclass(frozen=True)
class Classified:
    """Labelled mosaics through the pipeline: overall accuracy of its per-cell labels, the
    expert each scene was routed to (None: source), and each valid cell's retrieval
    embedding with its true class."""

    oa: float
    domains: list[str | None]
    embeddings: np.ndarray
    truth: np.ndarray

    @property
    def routed(self) -> float:
        """Share of the scenes routed to an adapted expert."""
        return sum(d is not None for d in self.domains) / max(len(self.domains), 1)


def classify(runtime: ModelRuntime, settings: Settings, scenes: list[tuple[Path, np.ndarray]],
             out: Path) -> Classified:
    """Run labelled mosaics through ``process_scene`` (routing included)."""
    hits = total = 0
    domains: list[str | None] = []
    embeddings, truths = [], []
    for i, (path, truth) in enumerate(scenes):
        outcome = process_scene(path, f"eval-{i}", out / f"eval-{i}", runtime, settings,
                                probe_sharpness=True)
        cells = outcome.cells
        rows = cells.windows[:, 1] // CELL
        cols = cells.windows[:, 0] // CELL
        hits += int((cells.labels == truth[rows, cols]).sum())
        total += len(cells)
        domains.append(cells.domain)
        embeddings.append(cells.embeddings[cells.valid])
        truths.append(truth[rows, cols][cells.valid])
    shutil.rmtree(out, ignore_errors=True)
    return Classified(hits / max(total, 1), domains, np.concatenate(embeddings),
                      np.concatenate(truths))


def cross_map_at_20(queries: Classified, gallery: Classified) -> float:
    """mAP@20 of ``queries``' cells ranked against ``gallery``'s (inner product of the
    L2-normalised embeddings; relevant: same class): "where else have we seen this?" asked
    from one sensor's scenes of an index built from another's."""
    sims = queries.embeddings @ gallery.embeddings.T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :20]
    ranked = gallery.truth[order] == queries.truth[:, None]
    n_relevant = np.array([(gallery.truth == t).sum() for t in queries.truth])
    return map_at_k(ranked, n_relevant, 20)


def bank_holdout_oa(bundle_dir: Path) -> float:
    """Accuracy of the adapted expert's head (the source head if none) on the held-back
    rows of the source bank: the gate's source figure."""
    bundle = load_bundle(bundle_dir)
    bank = bundle.source_bank
    head = read_head(bundle.classifier(adapted_domain(bundle)))
    return agreement(head.logits(bank.features[bank.holdout]), bank.labels[bank.holdout])


@dataclass(frozen=True)
class Box:
    """A fresh appliance state running the daemon's own objects: the model host, the drift
    monitor told of every switch, the adapter and its job runner."""

    settings: Settings
    host: ModelHost
    monitor: DriftMonitor
    jobs: AdaptationJobs

    @classmethod
    def fresh(cls, root: Path, bundle_dir: Path, variant: str) -> Box:
        settings = settings_for(root, VARIANTS[variant])
        store = ModelStore(settings.paths.state / "models")
        store.install(bundle_dir)
        host = ModelHost(store, settings)  # the daemon's owner of the running model
        monitor = DriftMonitor(host.bundle.reference, settings.drift, settings.paths.state)
        host.on_switch(lambda change: monitor.switch_model(change.bundle))
        adapter = Adapter(store, settings.adapt, settings.paths.state, settings.tiling)
        return cls(settings, host, monitor,
                   AdaptationJobs(adapter, host, settings.adapt.keep_versions, lambda _r: None))

    def ingest(self, scenes: list[Path], name: str, truth: list[str] | None = None
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float]:
        """Stream ``scenes`` as the daemon does (no labels): process, drift, collect, and a
        job whenever one is due. Returns per-scene records (``truth``: the real domain of
        each, for the record only), the jobs' reports and the seconds spent streaming."""
        stream: list[dict[str, Any]] = []
        jobs: list[dict[str, Any]] = []
        seconds = 0.0
        root = self.settings.paths.results
        for i, path in enumerate(scenes):
            t = time.perf_counter()
            outcome = process_scene(path, f"{name}-{i}", root / str(i), self.host.runtime,
                                    self.settings, probe_sharpness=True)
            report = self.monitor.observe(outcome.cells)
            self.jobs.collect(outcome.cells)
            seconds += time.perf_counter() - t
            scene = report.scene
            assert scene is not None, report.skipped
            stream.append({"scene": i, "truth": None if truth is None else truth[i],
                           "domain": outcome.cells.domain,
                           "drifting": report.drifting, "fired": report.fired,
                           "psi": round(scene.psi, 4), "mmd": round(scene.mmd, 4),
                           "mean_max_prob": round(scene.mean_max_prob, 4),
                           "ph_max_prob": round(report.window.ph_max_prob, 4),
                           "ph_entropy": round(report.window.ph_entropy, 4)})
            if self.jobs.due(report.drifting):  # the daemon's job, run to the end here
                jobs.append({"scene": i,
                             **self.jobs.run_here(f"drift at scene {i}").as_dict()})
        shutil.rmtree(root, ignore_errors=True)
        return stream, jobs, seconds


def run_condition(name: str, variant: str, shift: Shift, bundle_dir: Path,
                  images: list[np.ndarray], labels: np.ndarray, adapt_order: np.ndarray,
                  test_order: np.ndarray, clean_test: list[tuple[Path, np.ndarray]], work: Path
                  ) -> dict[str, Any]:
    t0 = time.perf_counter()
    root = work / f"{name}-{variant}"
    box = Box.fresh(root, bundle_dir, variant)
    settings, host = box.settings, box.host
    shifted = [shift(img) for img in images]
    adapt_scenes = write_mosaics(shifted, labels, adapt_order, root / "scenes", "adapt")
    test_scenes = write_mosaics(shifted, labels, test_order, root / "scenes", "test")
    target_before = classify(host.runtime, settings, test_scenes, root / "eval").oa
    stream, jobs, stream_seconds = box.ingest([p for p, _ in adapt_scenes], name)
    active = host.bundle
    target = classify(host.runtime, settings, test_scenes, root / "eval")
    source = classify(host.runtime, settings, clean_test, root / "eval")
    target_after, target_routed = target.oa, target.routed
    source_after, source_routed = source.oa, source.routed
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


HAZE = np.array([200, 205, 215], np.float32)
GRADUAL_SCENES, GRADUAL_RAMP = 50, 40


def hazed(img: np.ndarray, level: float) -> np.ndarray:
    """Gamma and haze growing with ``level`` (0: none, 1: gamma 1.4 under a 30 % veil, the
    ``gamma_haze`` shift)."""
    x = 255 * (img.astype(np.float32) / 255) ** (1 + 0.4 * level)
    return _clip((1 - 0.3 * level) * x + 0.3 * level * HAZE)


MIXED: dict[str, Shift] = {"source": no_shift, "colour_cast": colour_cast,
                           "sensor_combined": sensor}


def _stream_scenes(kind: str, images: list[np.ndarray], labels: np.ndarray,
                   adapt_order: np.ndarray, out: Path) -> tuple[list[Path], list[str]]:
    """The adapt half as one stream and the real domain of each scene. ``mixed``: the
    source sensor and two new ones, one scene of each in turn (20 of each). ``gradual``:
    ``GRADUAL_SCENES`` scenes whose haze grows over the first ``GRADUAL_RAMP``, then stays."""
    per = ROWS * COLS
    paths: list[Path] = []
    truth: list[str] = []
    if kind == "mixed":
        written = {d: write_mosaics([shift(img) for img in images], labels, adapt_order, out,
                                    f"adapt-{d}") for d, shift in MIXED.items()}
        for i in range(len(adapt_order) // per):
            for d in MIXED:
                paths.append(written[d][i][0])
                truth.append(d)
        return paths, truth
    for i in range(GRADUAL_SCENES):
        level = min(1.0, (i + 1) / GRADUAL_RAMP)
        idx = np.roll(adapt_order, -per * i)[:per]
        view = list(images)
        for j in idx:
            view[j] = hazed(images[j], level)
        paths.append(write_mosaics(view, labels, idx, out, f"adapt-{i:02d}")[0][0])
        truth.append("haze" if level < 1 else "haze_full")
    return paths, truth


def _routing(domains: dict[str, Classified]) -> tuple[dict[str, float], dict[str, int]]:
    """Per real domain: the share of its test scenes routed to its path (the source for
    source scenes, else the expert most of them went to), and how many experts serve it
    (each expert counted for the domain that sends it most test scenes)."""
    accuracy: dict[str, float] = {}
    owner: dict[str, tuple[int, str]] = {}
    for name, c in domains.items():
        experts = [d for d in c.domains if d is not None]
        path = None if name == "source" or not experts else max(set(experts), key=experts.count)
        accuracy[name] = sum(d == path for d in c.domains) / len(c.domains)
        for e in set(experts):
            n = experts.count(e)
            if n > owner.get(e, (0, ""))[0]:
                owner[e] = (n, name)
    per_domain = {name: sum(o == name for _, o in owner.values()) for name in domains}
    return accuracy, per_domain


def run_stream(kind: str, bundle_dir: Path, images: list[np.ndarray], labels: np.ndarray,
               adapt_order: np.ndarray, test_order: np.ndarray, work: Path) -> dict[str, Any]:
    """A mixed or gradual stream through a fresh box; each real domain's test half through
    ``process_scene`` before and after (routing included), and cross-domain retrieval both
    ways: each domain's test cells queried against an index of clean adapt-half cells, and
    those clean cells queried against an index of the domain's test cells as the box
    indexed them before and after."""
    t0 = time.perf_counter()
    root = work / kind
    box = Box.fresh(root, bundle_dir, "full")
    settings, host = box.settings, box.host
    scenes = root / "scenes"
    paths, truth = _stream_scenes(kind, images, labels, adapt_order, scenes)
    tests = ({d: [shift(img) for img in images] for d, shift in MIXED.items()} if kind == "mixed"
             else {"source": images, "haze_full": [hazed(img, 1.0) for img in images]})
    test_scenes = {d: write_mosaics(imgs, labels, test_order, scenes, f"test-{d}")
                   for d, imgs in tests.items()}
    gallery = classify(host.runtime, settings,
                       write_mosaics(images, labels, adapt_order, scenes, "gallery"),
                       root / "eval")  # the clean index, built by the source model
    before = {d: classify(host.runtime, settings, t, root / "eval")
              for d, t in test_scenes.items()}
    stream, jobs, seconds = box.ingest(paths, kind, truth)
    after = {d: classify(host.runtime, settings, t, root / "eval")
             for d, t in test_scenes.items()}
    accuracy, experts_per_domain = _routing(after)
    source_oa = before["source"].oa
    domains = {}
    for d in tests:
        cost = source_oa - before[d].oa
        domains[d] = {
            "oa_before": before[d].oa, "oa_after": after[d].oa, "shift_cost": cost,
            "recovered_fraction": (after[d].oa - before[d].oa) / cost if cost > 0.005 else None,
            "routing_accuracy": accuracy[d], "experts": experts_per_domain[d],
            "routed_to": {str(e): after[d].domains.count(e) for e in set(after[d].domains)},
            "retrieval_map20_vs_clean_index_before": cross_map_at_20(before[d], gallery),
            "retrieval_map20_vs_clean_index_after": cross_map_at_20(after[d], gallery),
            "retrieval_map20_clean_queries_vs_index_before": cross_map_at_20(gallery, before[d]),
            "retrieval_map20_clean_queries_vs_index_after": cross_map_at_20(gallery, after[d])}
    first_drift = next((r["scene"] for r in stream if r["drifting"]), None)
    promoted = [j for j in jobs if j["action"] == "promoted"]
    first_expert = next((j["scene"] for j in promoted if j["step"] == "input"), None)
    return {
        "stream": kind, "scenes": len(paths), "domains": domains,
        "source_oa_delta": after["source"].oa - source_oa,
        "drift_first_fired_at_scene": first_drift,
        "first_expert_promoted_at_scene": first_expert,
        "scenes_first_drift_to_promotion": None if first_drift is None or first_expert is None
        else first_expert - first_drift,
        "promotions": [{"scene": j["scene"], "step": j["step"], "domain": j["domain"],
                        "replaced": j["replaced"], "retired": j["retired"]} for j in promoted],
        "active_experts": [e.name for e in host.bundle.manifest.experts],
        "jobs": jobs, "records": stream,
        "stream_scenes_per_s": round(len(paths) / max(seconds, 1e-9), 3),
        "seconds": round(time.perf_counter() - t0, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=Path("/work/runs/aid_ft/bundle_renorm"))
    parser.add_argument("--split", type=Path, default=Path("/work/runs/aid_ft/split.json"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/adaptation.json"))
    parser.add_argument("--shifts", nargs="*", default=list(SHIFTS))
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--streams", nargs="*", default=[], choices=["mixed", "gradual"],
                        help="Run these streams instead of the per-shift conditions; their "
                        "JSON goes to --streams-out.")
    parser.add_argument("--streams-out", type=Path,
                        default=Path("benchmarks/results/adaptation_streams.json"))
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
    if args.streams:
        doc = {k: v for k, v in doc.items() if k != "results"} | {"streams": []}
        args.out = args.streams_out
        args.out.parent.mkdir(parents=True, exist_ok=True)
        try:
            for kind in args.streams:
                res = run_stream(kind, snapshot, images, labels, adapt_order, test_order, work)
                doc["streams"].append(res)
                print(json.dumps({k: v for k, v in res.items() if k not in ("jobs", "records")}),
                      flush=True)
                doc["seconds"] = round(time.perf_counter() - t0, 1)
                args.out.write_text(json.dumps(doc, indent=2) + "\n")
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    try:
        clean_root = work / "clean"
        settings = settings_for(clean_root)
        runtime = ModelRuntime(bundle, ProviderPlan(providers=("cpu",)))
        clean_test = write_mosaics(images, labels, test_order, clean_root / "scenes", "test")
        source_before = classify(runtime, settings, clean_test, clean_root / "eval").oa
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
