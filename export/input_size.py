"""The bundle's input size, chosen on the run's own validation chips (FixRes).

Random-resized training crops show objects larger than the whole-chip view the box
classifies, so a network is often best tested a little above the size it was trained at
(Touvron et al., *Fixing the train-test resolution discrepancy*, 2019). Which size is
best depends on the run and the data, so ``bundle --input-size auto`` scores a few
candidates on the run's validation split (never its training chips), the chips resized
straight to each size and the probabilities averaged over the bundle's TTA views as the
box will, and takes the best (ties to the smaller, cheaper size).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from sklearn.metrics import accuracy_score, f1_score

from appliance.model.tta import d4_views, mean_over_views
from export.data import load_chips, load_split
from export.train import load_trained, predict

STEPS = (1.0, 1.1, 1.2, 1.3, 1.4)  # candidate sizes as multiples of the training size


def candidate_sizes(trained: int) -> list[int]:
    """The training size and up to 40 % above it, rounded to multiples of 8."""
    return sorted({max(8, 8 * round(trained * step / 8)) for step in STEPS})


def validation_by_input_size(run_dir: Path, sizes: Sequence[int], views: int
                             ) -> dict[int, float]:
    """The run's validation score at each input size: accuracy (single-label) or micro-F1
    at 0.5 (multi-label), on probabilities averaged over ``views`` (1, or the 8 TTA
    views). Raises ``DataError`` for a run without a validation split."""
    info, model = load_trained(run_dir)
    val = load_split(run_dir, "val")
    labels = val.label_array()
    multi_label = info.task == "multi-label"
    scores = {}
    for size in sizes:
        chips = load_chips(val, size).images
        spec = info.input_spec.model_copy(update={"size": size})
        _, logits, _ = predict(model, chips if views == 1 else d4_views(chips), spec)
        t = torch.from_numpy(logits)
        probs = mean_over_views((t.sigmoid() if multi_label else t.softmax(1)).numpy(), views)
        scores[size] = float(f1_score(labels, probs > 0.5, average="micro") if multi_label
                             else accuracy_score(labels, probs.argmax(1)))
    return scores


def choose_input_size(scores: dict[int, float]) -> int:
    """The size with the best score; the smallest of those within rounding of it."""
    best = max(scores.values())
    return min(size for size, score in scores.items() if score >= best - 1e-9)

