"""Classification and multi-label measures: confusion matrix, OA, Cohen's kappa, F1 scores
(numpy); per-label thresholds, multi-label F1/AP and label-overlap retrieval (scikit-learn)."""

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


def calibrate_thresholds(truth: np.ndarray, probs: np.ndarray,
                         default: float = 0.5) -> np.ndarray:
    """Per label, the probability threshold that maximises that label's F1 on ``truth``.

    Chosen on a validation split at export and stored in the manifest. The threshold is the
    midpoint between the best-F1 score on the precision-recall curve and the next lower
    score, so it does not sit exactly on one validation chip's probability. A label with no
    positive (or no negative) validation chip keeps ``default``.
    """
    from sklearn.metrics import precision_recall_curve

    t = truth > 0
    out = np.full(t.shape[1], default, np.float64)
    for k in range(t.shape[1]):
        if t[:, k].all() or not t[:, k].any():
            continue
        precision, recall, cuts = precision_recall_curve(t[:, k], probs[:, k])
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        best = int(np.argmax(f1))
        below = probs[:, k][probs[:, k] < cuts[best]]
        out[k] = float((cuts[best] + below.max()) / 2) if below.size else float(cuts[best])
    return out


def multi_label_report(truth: np.ndarray, probs: np.ndarray, classes: list[str],
                       thresholds: np.ndarray | float = 0.5) -> dict[str, Any]:
    """Sigmoid outputs at per-label ``thresholds`` against multi-hot ``truth``.

    Micro, macro and example-based (``samples_f1``) F1, per-label F1 and threshold, exact
    match, and ``map_labels``: the mean over labels of their average precision (ranking the
    chips by each label's probability; labels without a positive chip are left out).
    """
    from sklearn.metrics import average_precision_score, f1_score

    t = (truth > 0).astype(np.uint8)
    th = np.broadcast_to(np.asarray(thresholds, np.float64), (t.shape[1],))
    p = (probs >= th).astype(np.uint8)
    per_label = f1_score(t, p, average=None, zero_division=0)
    present = t.any(axis=0)
    ap = average_precision_score(t[:, present], probs[:, present], average=None)
    return {
        "micro_f1": float(f1_score(t, p, average="micro", zero_division=0)),
        "macro_f1": float(f1_score(t, p, average="macro", zero_division=0)),
        "samples_f1": float(f1_score(t, p, average="samples", zero_division=0)),
        "per_class_f1": {c: float(per_label[k]) for k, c in enumerate(classes)},
        "thresholds": {c: float(th[k]) for k, c in enumerate(classes)},
        "map_labels": float(np.mean(ap)),
        "per_class_ap": {c: float(a) for c, a in zip(np.asarray(classes)[present], ap,
                                                      strict=True)},
        "exact_match": float((t == p).all(axis=1).mean()),
    }


def overlap_retrieval_report(query: np.ndarray, query_labels: np.ndarray,
                             gallery: np.ndarray | None = None,
                             gallery_labels: np.ndarray | None = None,
                             k: int = 20) -> dict[str, float]:
    """Multi-label retrieval scored by how many labels the top ``k`` neighbours share.

    Each query ranks the gallery by inner product (cosine for unit descriptors). Without a
    gallery every query is ranked against the OTHER queries (itself excluded). Reports mean
    Jaccard@k of the label sets, ACG@k (mean number of shared labels), nDCG@k with gain
    2^shared − 1 (sklearn's ``ndcg_score`` with those gains as relevance; the ideal is the
    best ordering of the whole gallery), and P@k "shares any label" as in the literature.
    Keys are named by the ``k`` asked for; a gallery smaller than ``k`` ranks all of it.
    """
    from sklearn.metrics import ndcg_score

    leave_one_out = gallery is None
    g = query if gallery is None else gallery
    gl = query_labels if gallery_labels is None else gallery_labels
    qh, gh = (query_labels > 0).astype(np.float32), (gl > 0).astype(np.float32)
    sims = query.astype(np.float32) @ g.astype(np.float32).T
    shared = qh @ gh.T
    union = qh.sum(1)[:, None] + gh.sum(1)[None, :] - shared
    if leave_one_out:
        keep = ~np.eye(len(query), dtype=bool)
        n = len(query) - 1
        sims, shared, union = (a[keep].reshape(len(query), n) for a in (sims, shared, union))
    depth = min(k, sims.shape[1])
    top = np.argsort(-sims, axis=1, kind="stable")[:, :depth]
    top_shared = np.take_along_axis(shared, top, axis=1)
    top_union = np.take_along_axis(union, top, axis=1)
    return {
        f"jaccard_at_{k}": float((top_shared / np.maximum(top_union, 1)).mean()),
        f"acg_at_{k}": float(top_shared.mean()),
        f"ndcg_at_{k}": float(ndcg_score(2.0 ** shared - 1, sims, k=depth)),
        f"shares_any_at_{k}": float((top_shared > 0).mean()),
    }
