"""The head step's numerical pieces, on small arrays (milliseconds)."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.adapt.learning import (
    SourceRows,
    agreement,
    class_entropy,
    fused_probs,
    retrieval_agreement,
    select_pseudo_labels,
)
from appliance.config import TilingConfig
from appliance.contract.bundle import SourceBank
from appliance.model.head import LinearHead
from appliance.model.runtime import probabilities
from appliance.scene.fusion import fuse


def test_pseudo_labels_are_confident_and_capped() -> None:
    probs = np.array([[0.9, 0.1, 0], [0.95, 0.05, 0], [0.8, 0.2, 0], [0.2, 0.7, 0.1],
                      [0.4, 0.35, 0.25]])
    assert select_pseudo_labels(probs, tau=0.6, cap=2).tolist() == [0, 1, 3]
    assert len(select_pseudo_labels(probs[:0], tau=0.6, cap=2)) == 0


@pytest.mark.parametrize(("fusion", "weights"), [("mean", None), ("max", None),
                                                 ("weighted", [0.2, 0.8])])
def test_fused_probs_fuse_with_the_pipeline_rule(fusion: str, weights: list[float] | None
                                                 ) -> None:
    rng = np.random.default_rng(0)
    head = LinearHead(rng.normal(size=(4, 3)).astype(np.float32), np.zeros(3, np.float32))
    feats = rng.normal(size=(10, 2, 4)).astype(np.float32)
    tiling = TilingConfig(scales=[16, 32], fusion=fusion, weights=weights)  # type: ignore[arg-type]
    per_scale = probabilities(head.logits(feats.reshape(20, 4)), False).reshape(10, 2, 3)
    np.testing.assert_array_equal(fused_probs(head, feats, tiling),
                                  fuse(per_scale, fusion, weights))
    # Features stored under another number of scales are averaged.
    three = TilingConfig(scales=[8, 16, 32], fusion="max")
    np.testing.assert_array_equal(fused_probs(head, feats, three), fuse(per_scale, "mean"))
    assert fused_probs(head, feats[:0], tiling).shape == (0, 3)  # no rows, no error


def test_source_rows_split_the_bank_and_confirm_by_neighbours() -> None:
    features = np.array([[0.0, 0], [0.1, 0], [0.2, 0], [5, 5], [5.1, 5], [5.2, 5]], np.float32)
    labels = np.array([0, 0, 0, 1, 1, 1])
    holdout = np.array([True, False, False, True, False, False])
    rows = SourceRows.of(SourceBank(features, labels, holdout))
    assert rows.index.ntotal == 4 and rows.train_y.tolist() == [0, 0, 1, 1]
    assert rows.holdout_y.tolist() == [0, 1] and rows.train_y.dtype == np.int64
    queries = np.array([[0.05, 0], [5.05, 5]], np.float32)
    agree = retrieval_agreement(rows.index, rows.train_y, queries, np.array([0, 0]), k=2)
    assert agree.tolist() == [1.0, 0.0]
    assert len(retrieval_agreement(rows.index, rows.train_y, queries[:0], labels[:0], 2)) == 0


def test_agreement_and_class_entropy() -> None:
    scores = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert agreement(scores, np.array([0, 1, 1])) == pytest.approx(2 / 3)
    assert agreement(scores[:0], np.zeros(0, np.int64)) == 0.0
    assert class_entropy(np.array([0, 1, 2, 0, 1, 2]), 3) == pytest.approx(1.0)
    assert class_entropy(np.array([1, 1, 1]), 3) == 0.0
    assert class_entropy(np.zeros(0, np.int64), 3) == 0.0
