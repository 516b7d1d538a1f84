"""AID recipes measured on a TEST split that no training, early stopping or recipe choice sees.

``/work/shared/data/aid`` (30 classes × 80 chips, 150 px) is split once, stratified, seed 0,
20 % of every class: 480 TEST chips and 1,920 TRAINVAL chips (ImageFolder trees of links
under ``RUNS/acc_split/aid``). ``terratile-export train`` only ever sees TRAINVAL and holds
out its own validation split inside it (``--val-fraction 0.1``, by the recipe's seed) for
the best epoch; the bundle is then evaluated once on TEST with ``terratile-export evaluate
--data TEST --json`` (the appliance's onnxruntime code), with the bundle's test-time
augmentation and with ``--tta off``. Appliance throughput is ``ModelRuntime.infer`` on a
batch of 32 test chips, CPU provider, all bundles taking turns (each opened afresh per round),
fastest of 5 rounds.

Recipes (``RECIPES``): efficientnet_lite0 and efficientnet_lite2 at 160 px, 6 epochs,
bundled with ``--tta flips-rot90`` over three seeds (``LITE0``, ``LITE2``); the same runs
bundled at a larger input (``at_fixres``: ``bundle --input-size``, 176 px), the size chosen
per backbone on the runs' own validation chips (``export.input_size``, written to
``RUNS/acc_aid/RUN_val_by_input_size.json`` and into each row); lite0 with a
domain-adaptive round first (``PRETRAIN``: UC Merced's scene classes, then ``--init``); a
longer schedule (10 epochs; seed 0 measured, its validation did not favour it); and the
previous recipe (128 px, 6 epochs) as the run ``aid_ft`` that other benchmarks share.
``FAMILIES`` names the seed groups summarised in the JSON, the default first. ``aid_ft``
was trained on the same 1,920 TRAINVAL chips but chose its best epoch on these 480 chips
(``--val-fraction 0.2 --seed 0`` over the whole folder is exactly this TEST split), so its
figure is flagged ``selected_on_test``.

Runs that already finished (all epochs in ``metrics.json``), bundles already written and
test scores already taken (``RUNS/acc_aid/NAME_test_tta_MODE.json``) are reused unless
``--retrain``.

    .venv/bin/python benchmarks/export_aid.py [--runs /work/runs] [--retrain]

Writes ``benchmarks/results/export_aid.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from appliance.config import BoxTta
from appliance.contract.bundle import load_bundle
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.model.tta import D4_VIEWS
from export.data import load_chips, scan, stratified_split
from export.input_size import validation_by_input_size

EXE = str(Path(sys.executable).parent / "terratile-export")
DATA = Path("/work/shared/data/aid")
TEST_FRACTION, TEST_SEED = 0.2, 0
KEYS = ("overall_accuracy", "kappa", "macro_f1", "map_at_20", "precision_at_5",
        "precision_at_20", "anmrr")
THROUGHPUT_BATCH, THROUGHPUT_RUNS = 32, 5


@dataclass(frozen=True)
class Recipe:
    """One row of the recipe table: how the run is trained and how it is bundled."""

    name: str
    size: int
    epochs: int
    seed: int
    tta: str  # the bundle's --tta
    backbone: str = "efficientnet_lite0"
    val_fraction: float = 0.1
    whole_folder: bool = False  # trained on the whole data folder (the shared aid_ft run)
    init: str | None = None  # a pre-training run (PRETRAIN) the AID run starts from
    bundle_size: int | None = None  # the bundle's --input-size (None: the training size)
    trained_as: str | None = None  # another recipe's run, bundled here at bundle_size

    @property
    def run_name(self) -> str:
        """The training run's name: this recipe's own, or the one it re-bundles."""
        return self.trained_as or self.name

    @property
    def domain_adaptive(self) -> bool:
        """Whether the run starts from in-domain pre-training rather than ImageNet alone."""
        return self.init is not None

    def train_args(self, runs: Path) -> list[str]:
        data = DATA if self.whole_folder else runs / "acc_split" / "aid" / "trainval"
        return ["train", "--data", str(data), "--backbone", self.backbone,
                "--image-size", str(self.size), "--epochs", str(self.epochs),
                "--batch-size", "32", "--lr", "1e-3", "--warmup-epochs", "0.5",
                "--threads", "1", "--val-fraction", str(self.val_fraction),
                "--seed", str(self.seed)] + ([] if self.whole_folder else ["--workers", "1"]) \
            + ([] if self.init is None else ["--init", str(runs / "acc_aid" / self.init)])

    def run_dir(self, runs: Path) -> Path:
        return runs / self.run_name if self.whole_folder else runs / "acc_aid" / self.run_name


UCM = Path("/work/shared/data/ucm/images")
# Domain-adaptive pre-training (Risojević & Stojnić): a round on UC Merced's 21 scene
# classes (all 1,470 chips, another sensor and another place: nothing of AID) from ImageNet
# weights; the AID run then starts from its backbone (and embedding head), a new classifier.
PRETRAIN = {"ucm_scene160": ["train", "--data", str(UCM), "--backbone", "efficientnet_lite0",
                             "--image-size", "160", "--epochs", "6", "--batch-size", "32",
                             "--lr", "1e-3", "--warmup-epochs", "0.5", "--threads", "1",
                             "--workers", "1", "--val-fraction", "0.1", "--seed", "0"]}
# Candidate bundle input sizes, scored on each run's own validation chips (never TEST).
INPUT_SIZES = (160, 176, 192, 208, 224)
# The larger bundle input per backbone: the size of INPUT_SIZES with the best mean validation
# OA over the backbone's three 160 px runs (ties to the smaller), read from the
# val_oa_tta_by_input_size rows before any test figure of a larger bundle.
FIXRES = {"efficientnet_lite0": 176, "efficientnet_lite2": 176}
SEEDS = (0, 1, 2)
LITE0 = [Recipe(f"lite0_160_s{seed}", 160, 6, seed, "flips-rot90") for seed in SEEDS]
LITE2 = [Recipe(f"lite2_160_s{seed}", 160, 6, seed, "flips-rot90",
                backbone="efficientnet_lite2") for seed in SEEDS]


def at_fixres(recipe: Recipe) -> Recipe:
    """``recipe``'s run bundled at its backbone's larger input (``FIXRES``)."""
    size = FIXRES[recipe.backbone]
    return replace(recipe, name=f"{recipe.name}_at{size}", bundle_size=size,
                   trained_as=recipe.name)


# The default recipe: of the candidates bundled as the box runs them, the best mean
# validation OA over the seeds (efficientnet_lite2 at 176 px: 0.941 against lite0's 0.939).
FAMILIES = {
    "efficientnet_lite2, 160 px, 6 epochs, bundled at 176 px, --tta flips-rot90":
        [at_fixres(r) for r in LITE2],
    "efficientnet_lite0, 160 px, 6 epochs, bundled at 176 px, --tta flips-rot90":
        [at_fixres(r) for r in LITE0],
    "efficientnet_lite0, 160 px, 6 epochs, --tta flips-rot90 (the previous default)": LITE0,
    "efficientnet_lite2, 160 px, 6 epochs, --tta flips-rot90": LITE2,
}
DEFAULT_RECIPE = next(iter(FAMILIES))
RECIPES = [Recipe("aid_ft", 128, 6, 0, "flips-rot90", val_fraction=0.2, whole_folder=True),
           *LITE0,
           *(Recipe(f"lite0_160_ucm_s{seed}", 160, 6, seed, "flips-rot90", init="ucm_scene160")
             for seed in SEEDS),
           *(Recipe(f"lite0_160_10ep_s{seed}", 160, 10, seed, "flips-rot90") for seed in SEEDS),
           *LITE2,
           *FAMILIES[DEFAULT_RECIPE],
           *(at_fixres(r) for r in LITE0)]


def make_split(runs: Path) -> dict[str, Any]:
    """TRAINVAL and TEST link trees; the TEST chips are the ``val`` of a seeded stratified
    split of the whole folder."""
    dataset = scan(DATA)
    trainval, test = stratified_split(dataset, TEST_FRACTION, TEST_SEED)
    for name, rows in (("trainval", trainval), ("test", test)):
        for i in rows:
            sample = dataset.samples[i]
            link = runs / "acc_split" / "aid" / name / dataset.classes[sample.labels[0]] / \
                sample.path.name
            link.parent.mkdir(parents=True, exist_ok=True)
            if not link.exists():
                link.symlink_to(sample.path.resolve())
    return {"test_chips": len(test), "trainval_chips": len(trainval),
            "test_fraction": TEST_FRACTION, "seed": TEST_SEED, "stratified": "per class"}


def _sh(args: list[str], capture: bool = False) -> str:
    print("+", " ".join(args), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # this checkout, not an installed copy
    done = subprocess.run(args, check=True, text=True, cwd=ROOT, env=env,
                          stdout=subprocess.PIPE if capture else None)
    return done.stdout or ""


def _finished(run: Path, epochs: int) -> bool:
    metrics = run / "metrics.json"
    return metrics.is_file() and len(json.loads(metrics.read_text())["epochs"]) == epochs


def throughput(bundles: dict[str, Path], test: Path) -> dict[str, dict[str, float]]:
    """Images per second of ``ModelRuntime.infer`` on one batch of 32 real test chips, per
    bundle with its TTA and with it off: the runtimes take turns for ``THROUGHPUT_RUNS``
    rounds and the fastest round counts (the CPU is shared, and other jobs only ever slow a
    round down). Each round opens every runtime afresh, warms it up, times one call and
    drops it: two dozen sessions with 8-view arenas do not fit in memory at once."""
    ds = scan(test)
    step = len(ds.samples) // THROUGHPUT_BATCH
    batch = ds.subset(list(range(0, step * THROUGHPUT_BATCH, step)))
    modes: tuple[BoxTta, ...] = ("bundle", "off")
    loaded = {name: load_bundle(path) for name, path in bundles.items()}
    tiles = {name: load_chips(batch, b.manifest.input.size).images for name, b in loaded.items()}
    best: dict[tuple[str, str], float] = {}
    for _ in range(THROUGHPUT_RUNS):
        for name, b in loaded.items():
            for mode in modes:
                runtime = ModelRuntime(b, ProviderPlan(providers=("cpu",)), mode)
                runtime.infer(tiles[name])
                t0 = time.perf_counter()
                runtime.infer(tiles[name])
                seconds = time.perf_counter() - t0
                del runtime  # its arena goes before the next one's grows
                best[name, mode] = min(best.get((name, mode), seconds), seconds)
    return {name: {f"img_per_s_tta_{mode}": THROUGHPUT_BATCH / best[name, mode] for mode in modes}
            for name in bundles}


def measure(recipe: Recipe, runs: Path, retrain: bool) -> dict[str, Any]:
    run = recipe.run_dir(runs)
    bundle = runs / "acc_aid" / f"{recipe.name}_bundle"
    test = runs / "acc_split" / "aid" / "test"
    if recipe.init is not None and (retrain or not _finished(runs / "acc_aid" / recipe.init, 6)):
        _sh([EXE, *PRETRAIN[recipe.init], "--out", str(runs / "acc_aid" / recipe.init)])
    if recipe.trained_as is None and (retrain or not _finished(run, recipe.epochs)):
        _sh([EXE, *recipe.train_args(runs), "--out", str(run)])
    if retrain or not (bundle / "manifest.json").is_file():
        _sh([EXE, "bundle", "--run", str(run), "--out", str(bundle), "--name", recipe.name,
             "--tta", recipe.tta]
            + ([] if recipe.bundle_size is None else ["--input-size", str(recipe.bundle_size)]))
    by_size = runs / "acc_aid" / f"{recipe.run_name}_val_by_input_size.json"
    if not recipe.whole_folder and (retrain or not by_size.is_file()):
        by_size.write_text(json.dumps(validation_by_input_size(run, INPUT_SIZES, D4_VIEWS)))
    train = json.loads((run / "metrics.json").read_text())
    out: dict[str, Any] = {
        "backbone": recipe.backbone, "image_size": recipe.size, "epochs": recipe.epochs,
        "seed": recipe.seed, "domain_adaptive": recipe.domain_adaptive,
        "pretrain_command": None if recipe.init is None else " ".join(PRETRAIN[recipe.init]),
        "bundle_tta": recipe.tta,
        "bundle_input_size": recipe.bundle_size or recipe.size,
        "selected_on_test": recipe.whole_folder,
        "train_command": " ".join(recipe.train_args(runs)),
        "train_seconds_wall": train["train_seconds"], "train_cpu_seconds": train.get("cpu_seconds"),
        "pretrain_seconds_wall": None if recipe.init is None else json.loads(
            (runs / "acc_aid" / recipe.init / "metrics.json").read_text())["train_seconds"],
        "best_epoch": train.get("best_epoch"),
        "val_score_per_epoch": [e.get("val_score") for e in train["epochs"]],
        "val_oa_tta_by_input_size": json.loads(by_size.read_text()) if by_size.is_file() else None,
    }
    modes: tuple[BoxTta, ...] = ("bundle", "off")
    for mode in modes:  # each bundle is scored on TEST once; the figures are kept
        scored = runs / "acc_aid" / f"{recipe.name}_test_tta_{mode}.json"
        if retrain or not scored.is_file():
            report = json.loads(_sh([EXE, "evaluate", "--bundle", str(bundle), "--data",
                                     str(test), "--tta", mode, "--json"], capture=True))
            scored.write_text(json.dumps({"views": report["views"], "chips": report["chips"],
                                          **{k: report[k] for k in KEYS}}))
        out[f"test_tta_{mode}"] = json.loads(scored.read_text())
    return out


def family_summary(results: dict[str, Any], recipes: list[Recipe]) -> dict[str, Any] | None:
    """Test OA over the seeds of ``recipes`` that are in ``results``, and their mean
    validation OA by bundle input size (None without any)."""
    seeds = [r for r in recipes if r.name in results]
    if not seeds:
        return None
    oa = [results[r.name]["test_tta_bundle"]["overall_accuracy"] for r in seeds]
    oa_off = [results[r.name]["test_tta_off"]["overall_accuracy"] for r in seeds]
    by_size = [results[r.name].get("val_oa_tta_by_input_size") for r in seeds]
    return {"seeds": [r.seed for r in seeds],
            "test_oa_tta": {"mean": statistics.mean(oa), "min": min(oa), "max": max(oa),
                            "stdev": statistics.stdev(oa) if len(oa) > 1 else None},
            "test_oa_no_tta": {"mean": statistics.mean(oa_off), "min": min(oa_off),
                               "max": max(oa_off)},
            "val_oa_tta_by_input_size_mean": None if None in by_size else {
                size: statistics.mean(v[size] for v in by_size) for size in by_size[0]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("/work/runs"))
    parser.add_argument("--retrain", action="store_true")
    parser.add_argument("--only", nargs="*", default=None, help="measure these recipes only")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/export_aid.json")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: this benchmark needs the AID data set")
    split = make_split(args.runs)
    measured = {r.name: measure(r, args.runs, args.retrain) for r in RECIPES
                if args.only is None or r.name in args.only}
    speed = throughput({name: args.runs / "acc_aid" / f"{name}_bundle" for name in measured},
                       args.runs / "acc_split" / "aid" / "test")
    for name, figures in speed.items():
        measured[name]["appliance_batch32"] = figures
    # Rows measured before and not re-measured now (--only) are kept as they were, flagged.
    kept = json.loads(args.out.read_text())["runs"] if args.out.is_file() else {}
    results = {name: {**row, "measured_in_an_earlier_run": True}
               for name, row in kept.items() if name not in measured} | measured
    doc = {"benchmark": "export_aid", "data": str(DATA), "split": split,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                       "note": "2-core CPU shared with other jobs during the runs"},
           "default": {"recipe": DEFAULT_RECIPE,
                       **(family_summary(results, FAMILIES[DEFAULT_RECIPE]) or {})},
           "families": {name: family_summary(results, recipes)
                        for name, recipes in FAMILIES.items()},
           "runs": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2))
    print(json.dumps(doc["default"], indent=2))


if __name__ == "__main__":
    main()
