"""``terratile-export``: the workstation CLI — train, bundle, evaluate."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal, Optional

import typer
from rich.console import Console

from appliance.contract.bundle import DEFAULT_SCALES, BundleError
from export.backbones import BACKBONES, BackboneError
from export.data import DataError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
console = Console(stderr=True)
TASKS = ("single-label", "multi-label")


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


@app.command("train")
def train_cmd(
    data: Path = typer.Option(..., help="ImageFolder directory, or a path,labels CSV."),
    backbone: str = typer.Option(..., help=f"One of {', '.join(BACKBONES)}."),
    out: Path = typer.Option(..., help="Run directory (checkpoint, metrics.json, split.json)."),
    epochs: int = typer.Option(8, min=1),
    image_size: int = typer.Option(
        128, min=0, help="Network input size in pixels (0: the backbone's native size)."),
    task: str = typer.Option("single-label", help="single-label or multi-label."),
    val_fraction: float = typer.Option(0.2, help="Held-out fraction of every class."),
    seed: int = typer.Option(0),
    init: Optional[Path] = typer.Option(None, help="Start from a previous run (second round)."),  # noqa: UP045
    pretrained: bool = typer.Option(True, "--pretrained/--no-pretrained"),
    batch_size: int = typer.Option(32, min=1),
    lr: float = typer.Option(1e-3),
    freeze_backbone: bool = typer.Option(False, help="Train the heads only (off-the-shelf)."),
    embedding_dim: int = typer.Option(128, min=2),
    warmup_epochs: float = typer.Option(1.0, min=0.0, help="Linear warm-up length (epochs)."),
    threads: int = typer.Option(2, min=1, help="torch CPU threads."),
    gsd: Optional[float] = typer.Option(  # noqa: UP045
        None, min=0.0, help="Ground sampling distance of the chips, metres per pixel "
        "(default: measured from georeferenced chips, else unknown)."),
    crop_min: Optional[float] = typer.Option(  # noqa: UP045
        None, min=0.05, max=1.0, help="Smallest crop area of a training view (default 0.35, "
        "0.8 for multi-label: labels describe the whole chip)."),
    device: str = typer.Option("auto", help="auto (CUDA when present), cpu, cuda[:N] or mps."),
    precision: str = typer.Option("32", help="32, 16-mixed (GPU) or bf16-mixed (autocast)."),
    workers: int = typer.Option(2, min=0, help="Data-loader processes decoding chips."),
    resume: bool = typer.Option(False, help="Continue OUT from its last epoch (last.pt)."),
    patience: int = typer.Option(
        0, min=0, help="Stop after this many epochs without a better val score (0: never)."),
) -> None:
    """Fine-tune BACKBONE on DATA with a classifier and an embedding head.

    Several GPUs or machines: launch it with torchrun, e.g.
    ``torchrun --nproc-per-node 2 -m export.cli train ...`` (DDP; --batch-size is global).
    """
    from export.device import DeviceError
    from export.distributed import from_env
    from export.train import TrainConfig, train

    if task not in TASKS:
        raise _fail(f"--task must be one of {TASKS}, got {task!r}")
    cfg = TrainConfig(data=data, backbone=backbone, out=out, epochs=epochs,
                      image_size=image_size or None, task=task,  # type: ignore[arg-type]
                      val_fraction=val_fraction, seed=seed, init=init, pretrained=pretrained,
                      batch_size=batch_size, lr=lr, freeze_backbone=freeze_backbone,
                      embedding_dim=embedding_dim, warmup_epochs=warmup_epochs,
                      threads=threads, gsd=gsd or None, device=device, precision=precision,
                      workers=workers, resume=resume, patience=patience,
                      crop_min=crop_min)
    try:
        run = train(cfg, console)
    except (DataError, BackboneError, DeviceError) as exc:
        raise _fail(str(exc)) from exc
    if from_env().is_main:
        console.print(f"run written to {run}")


@app.command("bundle")
def bundle_cmd(
    run: Path = typer.Option(..., help="A run directory written by `train`."),
    out: Path = typer.Option(..., help="Bundle directory to write."),
    fp16: bool = typer.Option(False, help="Convert the graphs to fp16 (float32 I/O)."),
    int8: bool = typer.Option(False, help="Static QDQ int8 backbone (needs --calibration)."),
    calibration: Optional[Path] = typer.Option(None, help="Images to calibrate int8 on."),  # noqa: UP045
    version: int = typer.Option(1, min=1),
    name: Optional[str] = typer.Option(None, help="Bundle name (default: the run's name)."),  # noqa: UP045
    scales: str = typer.Option(",".join(map(str, DEFAULT_SCALES)),
                               help="The box's default tile scales (px), comma-separated."),
    descriptor: str = typer.Option(
        "trained", help="Retrieval descriptor: 'trained' (embedding ⊕ posterior) or 'pooled' "
        "(L2-normalised backbone features, the off-the-shelf baseline)."),
    gsd: Optional[float] = typer.Option(  # noqa: UP045
        None, min=0.0, help="Training GSD, metres per pixel, recorded in the manifest "
        "(default: the run's, from `train --gsd` or its georeferenced chips)."),
    palette: Optional[Path] = typer.Option(  # noqa: UP045
        None, exists=True, dir_okay=False,
        help="Class colours: JSON/YAML mapping class name to #rrggbb or [r, g, b] "
        "(default: the semantic palette)."),
    input_size: Optional[str] = typer.Option(  # noqa: UP045
        None, help="Network input size of the bundle in px, or 'auto': the best of the "
        "training size and up to 40 percent above it on the run's validation chips (default: the "
        "training size). A little larger than trained matches the object scale of the "
        "training crops (FixRes) at (size ratio)^2 the backbone cost."),
    tta: str = typer.Option(
        "none", help="Test-time augmentation the box runs: 'none', or 'flips-rot90' "
        "(probabilities averaged over 8 flips/quarter turns; ~8x the backbone cost; a box "
        "turns it off with model.tta: off)."),
) -> None:
    """Export RUN as a sealed bundle: ONNX graphs, source bank, reference, manifest."""
    from export.bundler import BundleOptions, ParityError, Precision, bundle

    if fp16 and int8:
        raise _fail("choose one of --fp16 and --int8")
    if int8 and calibration is None:
        raise _fail("--int8 needs --calibration DIR")
    precision: Precision = "fp16" if fp16 else "int8" if int8 else "fp32"
    try:
        options = BundleOptions(precision=precision, calibration=calibration, version=version,
                                name=name, scales=tuple(int(s) for s in scales.split(",")),
                                descriptor=_descriptor(descriptor), gsd=gsd or None,
                                palette=palette, tta=_bundle_tta(tta),
                                input_size=_input_size(input_size))
        manifest = bundle(run, out, options, console)
    except (DataError, BundleError, ParityError, FileNotFoundError, ValueError) as exc:
        raise _fail(str(exc)) from exc
    console.print(f"bundle {manifest.name} v{manifest.version} sealed in {out}")


def _input_size(value: str | None) -> int | Literal["auto"] | None:
    if value is None:
        return None
    if value == "auto":
        return "auto"
    if value.isdigit() and int(value) >= 8:
        return int(value)
    raise _fail(f"--input-size must be a size of at least 8 px or 'auto', got {value!r}")


def _descriptor(value: str) -> Literal["trained", "pooled"]:
    if value == "trained":
        return "trained"
    if value == "pooled":
        return "pooled"
    raise _fail(f"--descriptor must be 'trained' or 'pooled', got {value!r}")


def _bundle_tta(value: str) -> Literal["none", "flips-rot90"]:
    if value == "none":
        return "none"
    if value == "flips-rot90":
        return "flips-rot90"
    raise _fail(f"--tta must be 'none' or 'flips-rot90', got {value!r}")


def _box_tta(value: str) -> Literal["bundle", "off"]:
    if value == "bundle":
        return "bundle"
    if value == "off":
        return "off"
    raise _fail(f"--tta must be 'bundle' or 'off', got {value!r}")


@app.command("evaluate")
def evaluate_cmd(
    bundle: Path = typer.Option(..., help="Bundle directory."),
    data: Optional[Path] = typer.Option(None, help="ImageFolder directory or labels CSV."),  # noqa: UP045
    run: Optional[Path] = typer.Option(None, help="Run directory whose split.json to use."),  # noqa: UP045
    split: Optional[str] = typer.Option(None, help="train or val (with --run)."),  # noqa: UP045
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    batch_size: int = typer.Option(64, min=1),
    gallery: Optional[Path] = typer.Option(  # noqa: UP045
        None, help="Multi-label: labels CSV of the archive that retrieval queries are ranked "
        "against (default: the evaluated chips among themselves)."),
    expert: Optional[str] = typer.Option(  # noqa: UP045
        None, help="Measure one path for every chip: an expert's name, or 'source' (default: "
        "route by signature, as the box does)."),
    route_chips: Optional[int] = typer.Option(  # noqa: UP045
        None, min=1, help="Route groups of this many chips (fixed shuffled order) each by its "
        "own signature (default: the whole data set is one group, like one scene)."),
    tta: str = typer.Option("bundle", help="'bundle': the bundle's test-time augmentation, "
                            "as a box runs it; 'off': the plain view (model.tta: off)."),
) -> None:
    """Evaluate BUNDLE through the appliance's onnxruntime code on labelled chips; a bundle
    with adapted experts is routed per group of chips, or measured on --expert alone."""
    from export.evaluate import evaluate, format_report

    try:
        report = evaluate(bundle, data=data, run=run, split=split, batch_size=batch_size,
                          gallery=gallery, expert=expert, route_chips=route_chips,
                          tta=_box_tta(tta))
    except (DataError, BundleError) as exc:
        raise _fail(str(exc)) from exc
    if as_json:
        typer.echo(json.dumps(report))
    else:
        typer.echo(format_report(report))


if __name__ == "__main__":  # torchrun -m export.cli train ...
    app()
