"""``terratile-export evaluate``: a bundle measured through the APPLIANCE's onnxruntime code.

Chips are resized to the bundle's input size and run with ``appliance.runtime.ModelRuntime``
on a bundle loaded (and sha256-verified) by ``appliance.bundle.load_bundle``, so the numbers
are those of the deployed model, not of torch. Classification (OA, kappa, macro-F1,
per-class accuracy, confusion matrix; micro/macro F1 for multi-label) and retrieval with the
embedding on the same chips (mAP@20 with the query excluded, P@5/10/20, ANMRR).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from appliance.contract.bundle import load_bundle
from appliance.contract.retrieval_metrics import retrieval_report
from appliance.model.runtime import ModelRuntime, ProviderPlan
from export.data import DataError, DataSet, load_chips, load_split, scan
from export.metrics import multi_label_report, single_label_report


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


def evaluate(bundle_dir: Path, data: Path | None = None, run: Path | None = None,
             split: str | None = None, batch_size: int = 64,
             plan: ProviderPlan | None = None) -> dict[str, Any]:
    """All measures as one JSON-able dict (keys ``overall_accuracy``, ``kappa``,
    ``macro_f1``, ``map_at_20`` and more)."""
    bundle = load_bundle(bundle_dir)
    manifest = bundle.manifest
    dataset = _dataset(data, run, split, manifest.task)
    labels = _relabel(dataset, manifest.class_names)
    chips = load_chips(dataset, manifest.input.size)
    if len(chips.bands) != len(manifest.input.bands):
        raise DataError(f"data has {len(chips.bands)} bands, the bundle expects "
                        f"{len(manifest.input.bands)} ({manifest.input.bands})")
    runtime = ModelRuntime(bundle, plan or ProviderPlan(providers=("cpu",)))
    probs, embeddings = [], []
    started = time.perf_counter()
    for i in range(0, len(chips.images), batch_size):
        result = runtime.infer(chips.images[i : i + batch_size])
        probs.append(result.probs)
        embeddings.append(result.embedding)
    seconds = time.perf_counter() - started
    p, e = np.concatenate(probs), np.concatenate(embeddings)
    report: dict[str, Any] = {"bundle": str(bundle_dir), "name": manifest.name,
                              "version": manifest.version, "task": manifest.task,
                              "chips": len(labels), "providers": runtime.providers,
                              "infer_seconds": seconds}
    if manifest.task == "multi-label":
        ml = multi_label_report(labels, p, manifest.class_names)
        report |= ml | {"overall_accuracy": ml["exact_match"], "kappa": None}
    else:
        report |= single_label_report(labels, p.argmax(axis=1), manifest.class_names)
    report |= retrieval_report(e, labels)
    return report


def format_report(report: dict[str, Any]) -> str:
    """A short human-readable summary (the JSON has everything)."""
    lines = [f"{report['name']} v{report['version']} on {report['chips']} chips "
             f"({', '.join(report['providers'])})"]
    for key in ("overall_accuracy", "kappa", "macro_f1", "micro_f1", "map_at_20",
                "precision_at_5", "precision_at_10", "precision_at_20", "anmrr"):
        if report.get(key) is not None:
            lines.append(f"  {key:<18} {report[key]:.4f}")
    per_class = report.get("per_class_accuracy") or report.get("per_class_f1") or {}
    worst = sorted(per_class.items(), key=lambda kv: kv[1])[:5]
    if worst:
        lines.append("  weakest classes: " + ", ".join(f"{c} {v:.2f}" for c, v in worst))
    return "\n".join(lines)
