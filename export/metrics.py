"""Classification measures (numpy): confusion matrix, OA, Cohen's kappa, F1 scores."""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(truth: np.ndarray, pred: np.ndarray, n_classes: int) -> np.ndarray:
    """[K,K] counts, rows = true class, columns = predicted class."""
    cm = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(cm, (truth, pred), 1)
    return cm


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def single_label_report(truth: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Overall accuracy, kappa, macro-F1, per-class accuracy (recall) and the confusion matrix."""
    cm = confusion_matrix(truth, pred, len(classes))
    total = cm.sum()
    observed = np.trace(cm) / total
    expected = float((cm.sum(0) * cm.sum(1)).sum()) / float(total) ** 2
    kappa = (observed - expected) / (1 - expected) if expected < 1 else 1.0
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1)
    f1 = _f1(tp, cm.sum(0) - tp, support - tp)
    present = support > 0
    return {
        "overall_accuracy": float(observed),
        "kappa": float(kappa),
        "macro_f1": float(f1[present].mean()),
        "per_class_accuracy": {c: float(tp[k] / support[k]) for k, c in enumerate(classes)
                               if support[k] > 0},
        "confusion_matrix": cm.tolist(),
    }


def multi_label_report(truth: np.ndarray, probs: np.ndarray, classes: list[str],
                       threshold: float = 0.5) -> dict[str, Any]:
    """Micro/macro F1 of sigmoid outputs at ``threshold``, plus per-class F1."""
    t = truth > 0
    p = probs >= threshold
    tp = (t & p).sum(0).astype(np.float64)
    fp = (~t & p).sum(0).astype(np.float64)
    fn = (t & ~p).sum(0).astype(np.float64)
    per_class = _f1(tp, fp, fn)
    return {
        "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),
        "macro_f1": float(per_class.mean()),
        "per_class_f1": {c: float(per_class[k]) for k, c in enumerate(classes)},
        "exact_match": float((t == p).all(axis=1).mean()),
    }
