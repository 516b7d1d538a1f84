"""The numerical pieces of a head step, free of files and state.

Fusing per-scale probabilities as the pipeline does (``fused_probs``), choosing confident
pseudo-labels (``select_pseudo_labels``), confirming them by the labels of their nearest
source-bank rows (``SourceRows``, ``retrieval_agreement``), fitting a softmax-regression
head (``fit_head``) and the figures a gate compares (``agreement``, ``class_entropy``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import faiss
import numpy as np
from scipy.optimize import minimize

from appliance.config import TilingConfig
from appliance.contract.bundle import SourceBank
from appliance.model.head import LinearHead
from appliance.model.runtime import probabilities
from appliance.scene.fusion import fuse


def fused_probs(head: LinearHead, features: np.ndarray, tiling: TilingConfig) -> np.ndarray:
    """Softmax per scale of [n,S,D] features, fused over scales with the pipeline's rule
    (``tiling.fusion``, ``tiling.weights``) → [n,K].

    Features stored under another number of scales than configured (the config changed
    since they were collected) have no rule or weights to go with: they are averaged.
    """
    n, s, d = features.shape
    if n == 0:  # e.g. no confirmed cell among the held-out ones: the gate says so
        return np.zeros((0, head.n_classes), np.float32)
    probs = probabilities(head.logits(features.reshape(n * s, d)), multi_label=False)
    configured = tiling.scales or tiling.weights
    if configured is not None and len(configured) != s:
        return fuse(probs.reshape(n, s, -1))
    return fuse(probs.reshape(n, s, -1), tiling.fusion, tiling.weights)


def select_pseudo_labels(probs: np.ndarray, tau: float, cap: int) -> np.ndarray:
    """Indexes of cells whose argmax confidence ≥ tau, at most ``cap`` per class (top first)."""
    labels, conf = probs.argmax(axis=1), probs.max(axis=1)
    keep = []
    for k in np.unique(labels):
        rows = np.flatnonzero((labels == k) & (conf >= tau))
        keep.append(rows[np.argsort(-conf[rows], kind="stable")][:cap])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


@dataclass(frozen=True)
class SourceRows:
    """A single-label source bank split for adaptation: the training rows (fitted with the
    target rows, and searched by ``index``, an exact L2 index over them) and the held-back
    rows (judged by the gate, never fitted nor searched)."""

    train_x: np.ndarray
    train_y: np.ndarray  # int64
    holdout_x: np.ndarray
    holdout_y: np.ndarray
    index: faiss.Index

    @classmethod
    def of(cls, bank: SourceBank) -> SourceRows:
        labels = bank.labels.astype(np.int64)
        train, hold = ~bank.holdout, bank.holdout
        index = faiss.IndexFlatL2(bank.features.shape[1])
        index.add(np.ascontiguousarray(bank.features[train]))
        return cls(bank.features[train], labels[train], bank.features[hold], labels[hold], index)


def retrieval_agreement(index: faiss.Index, bank_labels: np.ndarray, queries: np.ndarray,
                        labels: np.ndarray, k: int) -> np.ndarray:
    """Fraction of each query's k nearest source rows whose label equals the query's label."""
    if len(queries) == 0:
        return np.zeros(0, np.float32)
    _, nn = index.search(np.ascontiguousarray(queries, np.float32), min(k, index.ntotal))
    return (bank_labels[nn] == labels[:, None]).mean(axis=1).astype(np.float32)


def fit_head(features: np.ndarray, targets: np.ndarray, weights: np.ndarray, init: LinearHead,
             anchor: LinearHead, l2: float, deadline: float, max_iter: int = 200
             ) -> LinearHead:
    """Weighted softmax regression by L-BFGS, from ``init``, L2-pulled towards ``anchor``.

    ``targets`` are class indexes [n] or class distributions [n,K] (distillation).
    Minimises ``Σ wᵢ CE(xᵢ, tᵢ) + l2/2 ‖W − W_anchor‖²``; stops at ``deadline``
    (``time.monotonic``) so a job stays within its time budget.
    """
    d, k = init.weight.shape
    x = features.astype(np.float32)
    onehot = (np.eye(k, dtype=np.float32)[targets] if targets.ndim == 1
              else targets.astype(np.float32))
    w_rows = (weights / weights.sum()).astype(np.float32)[:, None]
    w_anchor = anchor.weight.astype(np.float64)

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        w = params[: d * k].reshape(d, k)
        b = params[d * k:]
        logits = x @ w.astype(np.float32) + b.astype(np.float32)
        logits -= logits.max(axis=1, keepdims=True)
        lse = np.log(np.exp(logits).sum(axis=1, keepdims=True))
        logp = logits - lse
        ce = -float((w_rows * onehot * logp).sum())
        err = w_rows * (np.exp(logp) - onehot)
        diff = w - w_anchor
        value = ce + 0.5 * l2 * float((diff**2).sum())
        grad_w = (x.T @ err).astype(np.float64) + l2 * diff
        return value, np.concatenate([grad_w.ravel(), err.sum(axis=0).astype(np.float64)])

    def stop(_: np.ndarray) -> None:
        if time.monotonic() > deadline:
            raise StopIteration

    start = np.concatenate([init.weight.ravel(), init.bias]).astype(np.float64)
    result = minimize(loss, start, jac=True, method="L-BFGS-B", callback=stop,
                      options={"maxiter": max_iter})
    params = result.x
    return LinearHead(params[: d * k].reshape(d, k).astype(np.float32),
                      params[d * k:].astype(np.float32))


def agreement(scores: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows of ``scores`` [n,K] (logits or probabilities) whose argmax equals
    ``labels`` [n]: a head's accuracy, or its agreement with pseudo-labels (0 for no rows)."""
    return float((scores.argmax(axis=1) == labels).mean()) if len(labels) else 0.0


def class_entropy(predicted: np.ndarray, n_classes: int) -> float:
    """Normalised entropy of the predicted-class histogram (1 = uniform, 0 = one class)."""
    if len(predicted) == 0:
        return 0.0
    p = np.bincount(predicted, minlength=n_classes) / len(predicted)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / np.log(max(n_classes, 2)))
