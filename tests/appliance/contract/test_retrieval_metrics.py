"""Retrieval measures against hand-computed rankings."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.contract.retrieval_metrics import (
    anmrr,
    map_at_k,
    precision_at_k,
    relevance_ranking,
    retrieval_report,
)


def test_perfect_clusters_score_perfectly() -> None:
    labels = np.repeat(np.arange(3), 4)
    emb = np.eye(3)[labels] + np.random.default_rng(0).normal(0, 0.01, (12, 3))
    report = retrieval_report(emb, labels, ks=(3, 5))
    assert report["map_at_3"] == pytest.approx(1.0)
    assert report["precision_at_3"] == pytest.approx(1.0)
    assert report["precision_at_5"] == pytest.approx(3 / 5)  # only 3 relevant others
    assert report["map_at_5"] == pytest.approx(1.0)
    assert report["anmrr"] == pytest.approx(0.0)


def test_query_is_excluded_and_hand_computed_ap() -> None:
    # Query 0 (class 0) ranks: item1 (class 1), item2 (class 0), item3 (class 1), item4 (class 0)
    emb = np.array([[1.0, 0], [0.99, 0.14], [0.98, 0.2], [0.95, 0.31], [0.9, 0.44]])
    labels = np.array([0, 1, 0, 1, 0])
    ranked, n_rel = relevance_ranking(emb, labels)
    assert ranked[0].tolist() == [False, True, False, True]
    assert n_rel[0] == 2
    # AP@4 of query 0: (1/2 + 2/4) / 2 = 0.5
    assert map_at_k(ranked[:1], n_rel[:1], 4) == pytest.approx(0.5)
    assert precision_at_k(ranked[:1], 2) == pytest.approx(0.5)


def test_anmrr_is_one_when_nothing_relevant_is_found_in_time() -> None:
    ranked = np.zeros((1, 20), bool)
    ranked[0, -1] = True  # the only relevant item comes last, beyond K = min(4, 2) = 2
    assert anmrr(ranked, np.array([1])) == pytest.approx(1.0)


def test_multi_label_relevance_shares_a_label() -> None:
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]], np.uint8)
    emb = np.eye(3)
    ranked, n_rel = relevance_ranking(emb, labels)
    assert n_rel.tolist() == [1, 1, 0]
    assert ranked[2].sum() == 0 and ranked[0].sum() == 1


def test_needs_two_items() -> None:
    with pytest.raises(ValueError, match="at least two"):
        relevance_ranking(np.ones((1, 4)), np.array([0]))
