"""The bundle's input size chosen on the run's validation chips (FixRes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from export.bundler import BundleOptions, bundle
from export.cli import app
from export.input_size import candidate_sizes, choose_input_size, validation_by_input_size
from export.train import METRICS

pytestmark = pytest.mark.slow  # scores and exports a real (tiny) network


def test_candidates_are_the_training_size_and_up_to_40_percent_above() -> None:
    assert candidate_sizes(160) == [160, 176, 192, 208, 224]
    assert candidate_sizes(32) == [32, 40, 48]


def test_the_best_size_wins_and_a_tie_goes_to_the_smaller() -> None:
    assert choose_input_size({160: 0.90, 176: 0.94, 192: 0.93}) == 176
    assert choose_input_size({160: 0.90, 176: 0.94, 208: 0.94}) == 176


def test_at_the_training_size_the_score_is_the_training_runs_own(tiny_run: Path) -> None:
    """One view at the size it was trained at: the same chips, the same view and the same
    score as the training loop's validation of its best epoch."""
    scores = validation_by_input_size(tiny_run / "run", [32, 48], views=1)
    best = json.loads((tiny_run / "run" / METRICS).read_text())["best"]["val_score"]
    assert scores[32] == pytest.approx(best, abs=1e-9)
    assert set(scores) == {32, 48} and 0.0 <= scores[48] <= 1.0


def test_auto_bundles_at_the_size_validation_chose(tiny_run: Path, tmp_path: Path) -> None:
    manifest = bundle(tiny_run / "run", tmp_path / "auto", BundleOptions(
        scales=(16, 32), input_size="auto", tta="flips-rot90"), Console(quiet=True))
    chosen = manifest.metrics["input_size"]
    assert chosen["split"] == "val" and chosen["views"] == 8
    scores = {int(k): v for k, v in chosen["scores"].items()}
    assert sorted(scores) == [32, 40, 48]
    assert manifest.input.size == choose_input_size(scores)
    assert manifest.metrics["train_input_size"] == 32


def test_a_bad_input_size_is_a_clear_error(tiny_run: Path, tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["bundle", "--run", str(tiny_run / "run"), "--out",
                                 str(tmp_path / "b"), "--input-size", "big"])
    assert r.exit_code == 2 and "--input-size must be a size of at least 8 px or 'auto'" \
        in r.output
    assert not (tmp_path / "b").exists()
