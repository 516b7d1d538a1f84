"""AID fine-tuning vs an off-the-shelf baseline, measured on the exported bundles.

Two runs of ``terratile-export`` on ``/work/shared/data/aid`` (30 classes × 80 chips), the
same seeded stratified split (val fraction 0.2, seed 0: 1920 train / 480 held out):

* ``aid_ft``: efficientnet_lite0 from the real ImageNet weights, fine-tuned end to end;
* ``aid_frozen``: the same backbone frozen, only the heads trained (off-the-shelf features).

Each is bundled (fp32; ONNX vs torch parity reported) and evaluated with
``terratile-export evaluate --run RUN --split val --json``, i.e. through the appliance's
onnxruntime code on exactly the held-out chips. Runs that already finished (all epochs in
``metrics.json``) are reused unless ``--retrain``; a missing bundle is written.

    .venv/bin/python benchmarks/export_aid.py [--runs /work/runs] [--retrain]

Writes ``benchmarks/results/export_aid.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EXE = str(Path(sys.executable).parent / "terratile-export")
DATA = Path("/work/shared/data/aid")
COMMON = ["--backbone", "efficientnet_lite0", "--image-size", "128", "--batch-size", "32",
          "--lr", "1e-3", "--warmup-epochs", "0.5", "--threads", "1", "--val-fraction", "0.2",
          "--seed", "0"]
RUNS: dict[str, list[str]] = {
    "aid_ft": ["--epochs", "6"],
    "aid_frozen": ["--epochs", "3", "--freeze-backbone"],
}
KEYS = ("overall_accuracy", "kappa", "macro_f1", "map_at_20", "precision_at_5",
        "precision_at_10", "precision_at_20", "anmrr")


def _finished(run: Path, epochs: int) -> bool:
    metrics = run / "metrics.json"
    return metrics.is_file() and len(json.loads(metrics.read_text())["epochs"]) == epochs


def _sh(args: list[str], capture: bool = False) -> str:
    print("+", " ".join(args), flush=True)
    done = subprocess.run(args, check=True, text=True, cwd=ROOT,
                          stdout=subprocess.PIPE if capture else None)
    return done.stdout or ""


def measure(name: str, extra: list[str], runs: Path, retrain: bool) -> dict[str, Any]:
    run, bundle = runs / name, runs / name / "bundle"
    epochs = int(extra[extra.index("--epochs") + 1])
    train_cmd = [EXE, "train", "--data", str(DATA), "--out", str(run), *COMMON, *extra]
    if retrain or not _finished(run, epochs):
        _sh(train_cmd)
    if retrain or not (bundle / "manifest.json").is_file():
        _sh([EXE, "bundle", "--run", str(run), "--out", str(bundle), "--name", name])
    t0 = time.perf_counter()
    report = json.loads(_sh([EXE, "evaluate", "--bundle", str(bundle), "--run", str(run),
                             "--split", "val", "--json"], capture=True))
    train = json.loads((run / "metrics.json").read_text())
    manifest = json.loads((bundle / "manifest.json").read_text())
    return {
        "train_command": " ".join(train_cmd[1:]),
        "train_seconds_wall": train["train_seconds"],
        "train_cpu_seconds": train.get("cpu_seconds"),
        "epoch_seconds": [e["epoch_seconds"] for e in train["epochs"]],
        "val_score_per_epoch": [e.get("val_score") for e in train["epochs"]],
        "parity_fp32": manifest["metrics"]["parity"]["fp32"],
        "exporter": manifest["metrics"]["exporter"],
        "held_out_chips": report["chips"],
        "evaluate_seconds": time.perf_counter() - t0,
        **{k: report[k] for k in KEYS},
        "per_class_accuracy": report["per_class_accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("/work/runs"))
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/export_aid.json")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: this benchmark needs the AID data set")
    results = {name: measure(name, extra, args.runs, args.retrain)
               for name, extra in RUNS.items()}
    doc = {"benchmark": "export_aid", "data": str(DATA), "split": "val 0.2, seed 0",
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "note": "CPU shared with other jobs during the runs"},
           "runs": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps({n: {k: r[k] for k in ("overall_accuracy", "kappa", "macro_f1",
                                            "map_at_20", "train_seconds_wall")}
                      for n, r in results.items()}, indent=2))


if __name__ == "__main__":
    main()
