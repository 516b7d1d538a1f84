"""Retrieval quality measures (pure numpy): mAP@k, P@k and ANMRR, as in SF300 and Compri et al.

Every item is used once as a query against all OTHER items (the query itself is excluded);
an item is relevant when it shares the query's class (single-label, labels [N] ints) or at
least one label (multi-label, labels [N,K] multi-hot). Shared by the exporter's
``evaluate`` and the appliance's index evaluation, so both report the same numbers.
"""

from __future__ import annotations

import numpy as np


def relevance_ranking(embeddings: np.ndarray, labels: np.ndarray,
                      depth: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per query, relevance of the ranked other items ([Q,depth] bool) and relevant counts [Q].

    Ranking is by descending inner product (cosine similarity for L2-normalised
    embeddings); ties break by item index, so results are deterministic.
    """
    n = len(embeddings)
    if n < 2:
        raise ValueError("retrieval metrics need at least two items")
    depth = n - 1 if depth is None else min(depth, n - 1)
    sims = embeddings.astype(np.float32) @ embeddings.astype(np.float32).T
    np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, :depth]
    relevant = _relevant(labels)
    np.fill_diagonal(relevant, False)
    ranked = np.take_along_axis(relevant, order, axis=1)
    return ranked, relevant.sum(axis=1)


def _relevant(labels: np.ndarray) -> np.ndarray:
    """[N,N] bool: item j is relevant to query i."""
    if labels.ndim == 1:
        return np.asarray(labels[:, None] == labels[None, :])
    hot = (labels > 0).astype(np.float32)
    return np.asarray((hot @ hot.T) > 0)


def precision_at_k(ranked: np.ndarray, k: int) -> float:
    """Mean fraction of relevant items among the top k."""
    return float(ranked[:, :k].mean())


def map_at_k(ranked: np.ndarray, n_relevant: np.ndarray, k: int) -> float:
    """Mean average precision over the top k, normalised by min(#relevant, k).

    A perfect ranking scores 1; queries with no relevant item are left out.
    """
    top = ranked[:, :k].astype(np.float64)
    hits = np.cumsum(top, axis=1)
    precision = hits / np.arange(1, top.shape[1] + 1)
    denom = np.minimum(n_relevant, k).astype(np.float64)
    valid = denom > 0
    if not valid.any():
        return 0.0
    return float(((precision * top).sum(axis=1)[valid] / denom[valid]).mean())


def anmrr(ranked: np.ndarray, n_relevant: np.ndarray) -> float:
    """Average normalised modified retrieval rank (MPEG-7): 0 is perfect, 1 is worst.

    K(q) = min(4·NG(q), 2·max NG); a relevant item ranked beyond K(q) counts as 1.25·K(q).
    ``ranked`` must reach depth K(q) for every query (use the full ranking).
    """
    gtm = int(n_relevant.max())
    scores = []
    for row, ng in zip(ranked, n_relevant, strict=True):
        if ng == 0:
            continue
        k = min(4 * int(ng), 2 * gtm)
        ranks = np.flatnonzero(row[:k]) + 1.0
        total = ranks.sum() + (ng - len(ranks)) * 1.25 * k
        mrr = total / ng - 0.5 - ng / 2.0
        scores.append(mrr / (1.25 * k - 0.5 - ng / 2.0))
    return float(np.mean(scores)) if scores else 1.0


def retrieval_report(embeddings: np.ndarray, labels: np.ndarray,
                     ks: tuple[int, ...] = (5, 10, 20)) -> dict[str, float]:
    """``map_at_20``-style keys: mAP@k and P@k for every k, and ``anmrr``."""
    ranked, n_relevant = relevance_ranking(embeddings, labels)
    report: dict[str, float] = {}
    for k in ks:
        report[f"map_at_{k}"] = map_at_k(ranked, n_relevant, k)
        report[f"precision_at_{k}"] = precision_at_k(ranked, k)
    report["anmrr"] = anmrr(ranked, n_relevant)
    return report
