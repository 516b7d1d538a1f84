"""Streaming training data: peak RAM of one training epoch does not grow with the chips.

Generates an ImageFolder of ``--chips`` PNG chips (three colour classes; each file a hard
link to one 128 px chip per class, so making 100,000 takes seconds and no disk, while every
one is still opened and decoded on its own), then trains one epoch of a random-init
resnet18 at 32 px with ``terratile-export train`` (2 loader workers, batch 64, 1 torch
thread) for each size, each in a fresh process. Peak RSS is ``getrusage`` maxrss of the
training process and, separately, of its loader workers. Decoding every chip into memory
(the old design) would hold chips x 3 x 128 x 128 float32 (``in_memory_bytes``).

    .venv/bin/python benchmarks/export_streaming.py [--chips 1000,100000]

Writes ``benchmarks/results/export_streaming.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TRAIN = ["--backbone", "resnet18", "--image-size", "32", "--no-pretrained", "--epochs", "1",
         "--batch-size", "64", "--threads", "1", "--workers", "2", "--embedding-dim", "16",
         "--val-fraction", "0.01"]


def make_chips(root: Path, n: int) -> Path:
    """``n`` chips over three classes, hard links to one generated PNG per class."""
    from tests.helpers.torch_bundle import write_colour_chips

    seed = write_colour_chips(root / "seed", per_class=1, size=128)
    data = root / "data"
    pngs = sorted(seed.rglob("*.png"))
    for k, png in enumerate(pngs):
        folder = data / png.parent.name
        folder.mkdir(parents=True)
        for i in range(k, n, len(pngs)):
            os.link(png, folder / f"{i:06d}.png")
    return data


def child(data: Path, out: Path) -> None:
    """Run in a fresh process: one training epoch, then this process's peak RSS."""
    import resource

    from rich.console import Console

    from export.cli import app

    try:
        app(["train", "--data", str(data), "--out", str(out), *TRAIN], standalone_mode=False)
    finally:
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        Console(stderr=True).print(f"peak RSS {own / 1e6:.0f} MB")
        print(json.dumps({"peak_rss_bytes": own, "worker_peak_rss_bytes": workers}))


def measure(n: int, tmp: Path) -> dict[str, Any]:
    data = make_chips(tmp / f"n{n}", n)
    out = tmp / f"run{n}"
    done = subprocess.run([sys.executable, __file__, "--child", str(data), str(out)],
                          check=True, text=True, stdout=subprocess.PIPE, cwd=ROOT)
    peaks = json.loads(done.stdout.strip().splitlines()[-1])
    metrics = json.loads((out / "metrics.json").read_text())
    epoch = metrics["epochs"][0]
    return {"chips": n, **peaks, "epoch_seconds": epoch["epoch_seconds"],
            "chips_per_second": n / epoch["epoch_seconds"],
            "in_memory_bytes": n * 3 * 128 * 128 * 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chips", default="1000,100000")
    parser.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks/results/export_streaming.json")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        runs = [measure(int(n), Path(tmp)) for n in args.chips.split(",")]
    doc = {"benchmark": "export_streaming", "train_args": TRAIN,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "note": "2 cores shared with other jobs"},
           "runs": runs,
           "peak_rss_ratio_largest_to_smallest": runs[-1]["peak_rss_bytes"]
           / runs[0]["peak_rss_bytes"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
