"""``terratile-export evaluate``: a bundle measured through the APPLIANCE's onnxruntime code.

Chips are resized to the bundle's input size and run with ``appliance.runtime.ModelRuntime``
on a bundle loaded (and sha256-verified) by ``appliance.bundle.load_bundle``, so the numbers
are those of the deployed model, not of torch. Classification (OA, kappa, macro-F1,
per-class accuracy, confusion matrix) and retrieval with the embedding on the same chips
(mAP@20 with the query excluded, P@5/10/20, ANMRR). A multi-label bundle is scored at its own
per-label thresholds (micro/macro/example F1, per-label F1, mAP over labels) and its
retrieval by label overlap (Jaccard@20, ACG@20, nDCG@20, "shares any"@20), among the chips
themselves or, with a gallery, each chip queried against the gallery (what a query against
the box's index of a source archive sees).

A bundle adapted on a box holds experts beside the source model (``bundle.Expert``); the
box routes each scene to one by its radiometric signature. Evaluation does the same, with
the box's own routing code (``appliance.model.routing``): the chips of the data set form
one group (``folder``, what a scene of that sensor is), or groups of ``route_chips`` chips
in a fixed shuffled order (``chips``); each group's signature picks its path. ``expert``
measures one path for every chip instead. The report says which path(s) it measured
(``routing``), so a promoted expert is never judged through the source model's path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from appliance.config import BoxTta
from appliance.contract.bundle import Bundle, load_bundle
from appliance.contract.retrieval_metrics import retrieval_report
from appliance.contract.signature import scene_signature
from appliance.model.routing import route
from appliance.model.runtime import ModelRuntime, ProviderPlan
from export.data import DataError, DataSet, load_chips, load_split, scan
from export.metrics import multi_label_report, overlap_retrieval_report, single_label_report


def _dataset(data: Path | None, run: Path | None, split: str | None, task: str) -> DataSet:
    if run is not None or split is not None:
        if run is None or split is None:
            raise DataError("--split and --run go together (evaluate a run's saved split)")
        return load_split(run, split)
    if data is None:
        raise DataError("give --data DIR, or --run RUN_DIR --split val")
    return scan(data, "multi-label" if task == "multi-label" else "single-label")


def _relabel(dataset: DataSet, bundle_classes: list[str]) -> np.ndarray:
    """The data set's labels re-indexed to the bundle's class order."""
    unknown = sorted(set(dataset.classes) - set(bundle_classes))
    if unknown:
        raise DataError(f"classes not in the bundle: {unknown} (bundle has {bundle_classes})")
    remap = np.asarray([bundle_classes.index(c) for c in dataset.classes])
    labels = dataset.label_array()
    if labels.ndim == 1:
        return np.asarray(remap[labels])
    out = np.zeros((len(labels), len(bundle_classes)), np.uint8)
    out[:, remap] = labels
    return out


SOURCE = "source"  # the source model's path in reports and ``--expert``
SIGNATURE_PIXELS = 20_000  # pixels per group whose band moments make its signature
RoutingMode = Literal["folder", "chips", "expert"]


@dataclass(frozen=True)
class PathsMeasured:
    """Which model path(s) an evaluation measured: how chips were assigned (``mode``), into
    how many routing groups, and how many chips each path (expert name or ``source``) got."""

    mode: RoutingMode
    groups: int
    chips: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "groups": self.groups, "chips": self.chips}


def _group_path(bundle: Bundle, images: np.ndarray, seed: int) -> str | None:
    """The expert a group of value-range chips [n,C,S,S] routes to, as the box routes a
    scene: band moments of a pixel sample and sharpness of the chips (model-input tiles)."""
    pixels = images.transpose(0, 2, 3, 1).reshape(-1, images.shape[1])
    if len(pixels) > SIGNATURE_PIXELS:
        pick = np.random.default_rng(seed).choice(len(pixels), SIGNATURE_PIXELS, replace=False)
        pixels = pixels[pick]
    return route(bundle, scene_signature(pixels, images))


def _assign(bundle: Bundle, images: np.ndarray, expert: str | None,
            route_chips: int | None) -> tuple[list[str | None], PathsMeasured]:
    """The path (None: source) of every chip, and the summary of what was measured."""
    n = len(images)
    if expert is not None:
        name = None if expert == SOURCE else expert
        bundle.manifest.expert(name)  # BundleError for a name the bundle does not have
        return [name] * n, PathsMeasured("expert", 1, {expert: n})
    order = np.random.default_rng(0).permutation(n) if route_chips else np.arange(n)
    size = route_chips or max(n, 1)
    paths: list[str | None] = [None] * n
    groups = [order[i:i + size] for i in range(0, n, size)]
    for g, members in enumerate(groups):
        name = _group_path(bundle, images[np.sort(members)], g)
        for i in members:
            paths[int(i)] = name
    counts: dict[str, int] = {}
    for name in paths:
        counts[name or SOURCE] = counts.get(name or SOURCE, 0) + 1
    return paths, PathsMeasured("chips" if route_chips else "folder", len(groups), counts)


def _infer(runtime: ModelRuntime, dataset: DataSet, batch_size: int,
           expert: str | None = None, route_chips: int | None = None,
           with_probs: bool = True) -> tuple[np.ndarray, np.ndarray, PathsMeasured]:
    """Class probabilities and retrieval descriptors of every chip, through onnxruntime,
    each chip on the path its routing group (or ``expert``) chose. ``with_probs`` False
    (a retrieval gallery) runs only the plain view the descriptor comes from: test-time
    augmentation would run 8 backbone passes a chip for probabilities nobody reads."""
    manifest = runtime.bundle.manifest
    chips = load_chips(dataset, manifest.input.size)
    if len(chips.bands) != len(manifest.input.bands):
        raise DataError(f"data has {len(chips.bands)} bands, the bundle expects "
                        f"{len(manifest.input.bands)} ({manifest.input.bands})")
    paths, measured = _assign(runtime.bundle, chips.images, expert, route_chips)
    n = len(chips.images)
    probs = np.zeros((n, len(manifest.classes)), np.float32)
    embeddings = np.zeros((n, manifest.embedding_dim), np.float32)
    for name in dict.fromkeys(paths):
        rows = np.flatnonzero([p == name for p in paths])
        for i in range(0, len(rows), batch_size):
            batch = rows[i : i + batch_size]
            if not with_probs:
                embeddings[batch] = runtime.embed(runtime.features(chips.images[batch], name))
                continue
            result = runtime.infer(chips.images[batch], name)
            probs[batch] = result.probs
            embeddings[batch] = result.embedding
    return probs, embeddings, measured


def evaluate(bundle_dir: Path, data: Path | None = None, run: Path | None = None,
             split: str | None = None, batch_size: int = 64,
             plan: ProviderPlan | None = None, gallery: Path | None = None,
             expert: str | None = None, route_chips: int | None = None,
             tta: BoxTta = "bundle") -> dict[str, Any]:
    """All measures as one JSON-able dict (keys ``overall_accuracy``, ``kappa``,
    ``macro_f1``, ``map_at_20`` and more; ``micro_f1``, ``jaccard_at_20``, ``ndcg_at_20``
    and more for multi-label bundles). ``gallery`` (labelled chips, multi-label only) is
    what the label-overlap retrieval queries are ranked against. ``expert`` (an expert's
    name or ``source``) measures that path alone; otherwise the chips are routed, as one
    group or in groups of ``route_chips`` (``routing`` in the report says how). ``tta`` is
    the box's ``model.tta``: 'bundle' follows the manifest, 'off' measures the plain view."""
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    dataset = _dataset(data, run, split, manifest.task)
    labels = _relabel(dataset, manifest.class_names)
    if gallery is not None and manifest.task != "multi-label":
        raise DataError("--gallery is for multi-label bundles (label-overlap retrieval)")
    runtime = ModelRuntime(bundle, plan or ProviderPlan(providers=("cpu",)), tta)
    started = time.perf_counter()
    p, e, measured = _infer(runtime, dataset, batch_size, expert, route_chips)
    seconds = time.perf_counter() - started
    report: dict[str, Any] = {"bundle": str(bundle_dir), "name": manifest.name,
                              "version": manifest.version, "task": manifest.task,
                              "chips": len(labels), "providers": runtime.providers,
                              "views": runtime.views, "infer_seconds": seconds,
                              "routing": measured.as_dict()}
    if manifest.task == "multi-label":
        ml = multi_label_report(labels, p, manifest.class_names, manifest.thresholds)
        report |= ml | {"overall_accuracy": ml["exact_match"], "kappa": None}
        report |= overlap_retrieval_report(e, labels)
        if gallery is not None:
            gallery_set = scan(gallery, "multi-label")
            _, g, _ = _infer(runtime, gallery_set, batch_size, expert, route_chips,
                             with_probs=False)
            report |= {"gallery": str(gallery), "gallery_chips": len(g)} | {
                f"gallery_{key}": value for key, value in overlap_retrieval_report(
                    e, labels, g, _relabel(gallery_set, manifest.class_names)).items()}
    else:
        report |= single_label_report(labels, p.argmax(axis=1), manifest.class_names)
    report |= retrieval_report(e, labels)
    return report


def format_report(report: dict[str, Any]) -> str:
    """A short human-readable summary (the JSON has everything)."""
    paths = ", ".join(f"{name} {n}" for name, n in report["routing"]["chips"].items())
    lines = [f"{report['name']} v{report['version']} on {report['chips']} chips "
             f"({', '.join(report['providers'])}); paths ({report['routing']['mode']}): {paths}"]
    for key in ("overall_accuracy", "kappa", "macro_f1", "micro_f1", "map_labels", "map_at_20",
                "precision_at_5", "precision_at_10", "precision_at_20", "anmrr",
                "jaccard_at_20", "acg_at_20", "ndcg_at_20", "gallery_jaccard_at_20",
                "gallery_acg_at_20", "gallery_ndcg_at_20", "gallery_shares_any_at_20"):
        if report.get(key) is not None:
            lines.append(f"  {key:<18} {report[key]:.4f}")
    per_class = report.get("per_class_accuracy") or report.get("per_class_f1") or {}
    worst = sorted(per_class.items(), key=lambda kv: kv[1])[:5]
    if worst:
        lines.append("  weakest classes: " + ", ".join(f"{c} {v:.2f}" for c, v in worst))
    return "\n".join(lines)
