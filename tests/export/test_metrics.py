"""Classification measures against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from export.metrics import (
    calibrate_thresholds,
    confusion_matrix,
    multi_label_report,
    overlap_retrieval_report,
    single_label_report,
)


def test_kappa_oa_f1_by_hand() -> None:
    truth = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1, 1])
    pred = np.array([0, 0, 0, 1, 1, 1, 1, 1, 0, 0])
    r = single_label_report(truth, pred, ["a", "b"])
    assert r["confusion_matrix"] == [[3, 1], [2, 4]]
    assert r["overall_accuracy"] == pytest.approx(0.7)
    pe = (4 * 5 + 6 * 5) / 100  # row × column marginals
    assert r["kappa"] == pytest.approx((0.7 - pe) / (1 - pe))
    f1_a, f1_b = 2 * 3 / (6 + 1 + 2), 2 * 4 / (8 + 2 + 1)
    assert r["macro_f1"] == pytest.approx((f1_a + f1_b) / 2)
    assert r["per_class_accuracy"] == {"a": 0.75, "b": pytest.approx(4 / 6)}


def test_confusion_matrix_counts_every_pair() -> None:
    cm = confusion_matrix(np.array([2, 2, 0]), np.array([2, 1, 0]), 3)
    assert cm.tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 1]]


def test_multi_label_f1() -> None:
    truth = np.array([[1, 0], [1, 1], [0, 1]])
    probs = np.array([[0.9, 0.2], [0.8, 0.1], [0.7, 0.6]])
    r = multi_label_report(truth, probs, ["x", "y"])
    # x: tp 2, fp 1, fn 0 → 4/5; y: tp 1, fp 0, fn 1 → 2/3; micro: tp 3, fp 1, fn 1 → 6/8
    assert r["per_class_f1"] == {"x": pytest.approx(0.8), "y": pytest.approx(2 / 3)}
    assert r["micro_f1"] == pytest.approx(0.75)
    assert r["exact_match"] == pytest.approx(1 / 3)


def test_per_label_thresholds_change_the_f1() -> None:
    truth = np.array([[1, 0], [1, 1], [0, 1]])
    probs = np.array([[0.9, 0.2], [0.8, 0.1], [0.7, 0.6]])
    r = multi_label_report(truth, probs, ["x", "y"], np.array([0.75, 0.05]))
    # x at 0.75: tp 2, fp 0 → 1.0; y at 0.05: tp 2, fp 1 → 0.8
    assert r["per_class_f1"] == {"x": pytest.approx(1.0), "y": pytest.approx(0.8)}
    assert r["thresholds"] == {"x": 0.75, "y": 0.05}
    # AP of x: positives ranked 1, 2 → 1.0; y: ranks 1 and 3 → (1 + 2/3) / 2
    assert r["map_labels"] == pytest.approx((1.0 + (1 + 2 / 3) / 2) / 2)


def test_calibrated_threshold_maximises_each_label_f1() -> None:
    rng = np.random.default_rng(0)
    truth = rng.random((200, 3)) < 0.4
    probs = np.clip(truth * 0.3 + rng.random((200, 3)) * 0.7, 0, 1)
    truth[:, 2] = True  # a label with no negative keeps the default
    th = calibrate_thresholds(truth, probs)
    assert th[2] == 0.5
    for k in range(2):
        best = multi_label_report(truth[:, :2], probs[:, :2], ["a", "b"], th[:2])
        for other in np.linspace(0.05, 0.95, 19):
            trial = th[:2].copy()
            trial[k] = other
            worse = multi_label_report(truth[:, :2], probs[:, :2], ["a", "b"], trial)
            assert best["per_class_f1"]["ab"[k]] >= worse["per_class_f1"]["ab"[k]] - 1e-12


def test_overlap_retrieval_by_hand() -> None:
    labels = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 0], [0, 0, 1]])
    # item 0 is nearest item 2 (one shared label), then item 1 (two shared), then item 3
    emb = np.array([[1.0, 0.0], [0.6, 0.8], [0.9, 0.436], [-1.0, 0.0]])
    gallery, g_labels = emb[1:], labels[1:]
    r = overlap_retrieval_report(emb[:1], labels[:1], gallery, g_labels, k=2)
    assert r["jaccard_at_2"] == pytest.approx((1 / 2 + 2 / 2) / 2)
    assert r["acg_at_2"] == pytest.approx(1.5)
    assert r["shares_any_at_2"] == 1.0
    dcg = (2**1 - 1) / np.log2(2) + (2**2 - 1) / np.log2(3)
    ideal = (2**2 - 1) / np.log2(2) + (2**1 - 1) / np.log2(3)
    assert r["ndcg_at_2"] == pytest.approx(dcg / ideal)
    # without a gallery every item is ranked against the others, itself excluded
    loo = overlap_retrieval_report(emb, labels, k=1)
    assert loo["shares_any_at_1"] == pytest.approx(3 / 4)  # item 3 shares nothing
