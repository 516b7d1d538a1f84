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
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from appliance.config import BoxTta
from appliance.contract.bundle import load_bundle
from appliance.contract.retrieval_metrics import retrieval_report
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


def _infer(runtime: ModelRuntime, dataset: DataSet,
           batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Class probabilities and retrieval descriptors of every chip, through onnxruntime."""
    manifest = runtime.bundle.manifest
    chips = load_chips(dataset, manifest.input.size)
    if len(chips.bands) != len(manifest.input.bands):
        raise DataError(f"data has {len(chips.bands)} bands, the bundle expects "
                        f"{len(manifest.input.bands)} ({manifest.input.bands})")
    probs, embeddings = [], []
    for i in range(0, len(chips.images), batch_size):
        result = runtime.infer(chips.images[i : i + batch_size])
        probs.append(result.probs)
        embeddings.append(result.embedding)
    return np.concatenate(probs), np.concatenate(embeddings)


def evaluate(bundle_dir: Path, data: Path | None = None, run: Path | None = None,
             split: str | None = None, batch_size: int = 64,
             plan: ProviderPlan | None = None, gallery: Path | None = None,
             tta: BoxTta = "bundle") -> dict[str, Any]:
    """All measures as one JSON-able dict (keys ``overall_accuracy``, ``kappa``,
    ``macro_f1``, ``map_at_20`` and more; ``micro_f1``, ``jaccard_at_20``, ``ndcg_at_20``
    and more for multi-label bundles). ``gallery`` (labelled chips, multi-label only) is
    what the label-overlap retrieval queries are ranked against. ``tta`` is the box's
    ``model.tta``: 'bundle' follows the manifest, 'off' measures the plain view."""
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    dataset = _dataset(data, run, split, manifest.task)
    labels = _relabel(dataset, manifest.class_names)
    if gallery is not None and manifest.task != "multi-label":
        raise DataError("--gallery is for multi-label bundles (label-overlap retrieval)")
    runtime = ModelRuntime(bundle, plan or ProviderPlan(providers=("cpu",)), tta)
    started = time.perf_counter()
    p, e = _infer(runtime, dataset, batch_size)
    seconds = time.perf_counter() - started
    report: dict[str, Any] = {"bundle": str(bundle_dir), "name": manifest.name,
                              "version": manifest.version, "task": manifest.task,
                              "chips": len(labels), "providers": runtime.providers,
                              "views": runtime.views,
                              "infer_seconds": seconds}
    if manifest.task == "multi-label":
        ml = multi_label_report(labels, p, manifest.class_names, manifest.thresholds)
        report |= ml | {"overall_accuracy": ml["exact_match"], "kappa": None}
        report |= overlap_retrieval_report(e, labels)
        if gallery is not None:
            gallery_set = scan(gallery, "multi-label")
            _, g = _infer(runtime, gallery_set, batch_size)
            report |= {"gallery": str(gallery), "gallery_chips": len(g)} | {
                f"gallery_{key}": value for key, value in overlap_retrieval_report(
                    e, labels, g, _relabel(gallery_set, manifest.class_names)).items()}
    else:
        report |= single_label_report(labels, p.argmax(axis=1), manifest.class_names)
    report |= retrieval_report(e, labels)
    return report


def format_report(report: dict[str, Any]) -> str:
    """A short human-readable summary (the JSON has everything)."""
    lines = [f"{report['name']} v{report['version']} on {report['chips']} chips "
             f"({', '.join(report['providers'])})"]
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
