"""Classification measures against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from export.metrics import confusion_matrix, multi_label_report, single_label_report


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
