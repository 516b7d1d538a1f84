"""Fusion of per-scale probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from appliance.scene.fusion import FUSERS, fuse

# two cells, two scales, three classes
P = np.array([[[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]],
              [[0.2, 0.2, 0.6], [0.3, 0.3, 0.4]]], np.float32)


def test_registry_names() -> None:
    assert set(FUSERS) == {"mean", "max", "weighted"}


def test_mean() -> None:
    np.testing.assert_allclose(fuse(P, "mean"), [[0.4, 0.4, 0.2], [0.25, 0.25, 0.5]], atol=1e-6)


def test_max_is_renormalised_for_single_label() -> None:
    out = fuse(P, "max")
    np.testing.assert_allclose(out[0], np.array([0.7, 0.6, 0.3]) / 1.6, atol=1e-6)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-6)


def test_max_is_left_per_class_for_multi_label() -> None:
    np.testing.assert_allclose(fuse(P, "max", multi_label=True)[0], [0.7, 0.6, 0.3], atol=1e-6)


def test_weighted_follows_the_weights() -> None:
    np.testing.assert_allclose(fuse(P, "weighted", [1.0, 0.0]), P[:, 0], atol=1e-6)
    np.testing.assert_allclose(fuse(P, "weighted", [1.0, 3.0])[0],
                               0.25 * P[0, 0] + 0.75 * P[0, 1], atol=1e-6)


def test_bad_rule_or_weights() -> None:
    with pytest.raises(ValueError, match="unknown fusion rule"):
        fuse(P, "median")
    with pytest.raises(ValueError, match="weights"):
        fuse(P, "weighted", [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="weights"):
        fuse(P, "weighted", [0.0, 0.0])
