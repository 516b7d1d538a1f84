"""``terratile-export train``: fine-tune a backbone with a classifier and an embedding head.

Recipe (Risojević & Stojnić; SF300): ImageNet init (or ``--init`` a previous run for a
second, domain-adaptive round), multi-scale crops + dihedral augmentation, AdamW with a
linear warm-up and cosine decay, cross-entropy on the classifier plus a normalised-softmax
proxy loss on the L2-normalised embedding. A seeded stratified split is saved as
``split.json``; every epoch writes ``checkpoint.pt`` and appends to ``metrics.json``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from appliance.contract.bundle import InputSpec, Task
from appliance.contract.durable import atomic_write_text
from export.augment import augment
from export.backbones import build_backbone
from export.data import (
    Chips,
    DataError,
    DataSet,
    load_chips,
    measured_gsd,
    read_chip,
    save_split,
    scan,
    stratified_split,
)
from export.model import ProxyLoss, TerratileNet

RUN_FILE = "run.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"


@dataclass
class TrainConfig:
    """Everything ``train`` needs; saved as ``run.json`` next to the checkpoint."""

    data: Path
    backbone: str
    out: Path
    epochs: int = 8
    image_size: int = 128
    task: Task = "single-label"
    val_fraction: float = 0.2
    seed: int = 0
    init: Path | None = None
    pretrained: bool = True
    batch_size: int = 32
    lr: float = 1e-3
    freeze_backbone: bool = False
    embedding_dim: int = 128
    warmup_epochs: float = 1.0
    proxy_weight: float = 1.0
    threads: int = 2
    gsd: float | None = None  # metres per pixel of the chips; None: measured if georeferenced


@dataclass
class RunInfo:
    """``run.json``: how to rebuild the trained network and what its input is."""

    backbone: str
    task: Task
    classes: list[str]
    input: dict[str, Any]
    feature_dim: int
    embedding_dim: int
    config: dict[str, Any] = field(default_factory=dict)
    gsd: float | None = None  # training chips' ground sampling distance, metres

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec.model_validate(self.input)

    def save(self, run_dir: Path) -> None:
        atomic_write_text(run_dir / RUN_FILE, json.dumps(asdict(self), indent=2, default=str))

    @classmethod
    def load(cls, run_dir: Path) -> RunInfo:
        path = Path(run_dir) / RUN_FILE
        if not path.is_file():
            raise DataError(f"{run_dir}: not a training run (no {RUN_FILE})")
        return cls(**json.loads(path.read_text()))


def input_spec(chips: Chips, backbone_mean: list[float], backbone_std: list[float],
               size: int) -> InputSpec:
    """The weights' own normalisation for 8-bit RGB; per-band data statistics otherwise."""
    if len(chips.bands) == 3 and chips.value_range == (0.0, 255.0):
        return InputSpec(bands=chips.bands, value_range=chips.value_range, scale=1.0,
                         mean=backbone_mean, std=backbone_std, size=size)
    mean = chips.images.mean(axis=(0, 2, 3))
    std = np.maximum(chips.images.std(axis=(0, 2, 3)), 1e-6)
    return InputSpec(bands=chips.bands, value_range=chips.value_range, scale=1.0,
                     mean=[float(v) for v in mean], std=[float(v) for v in std], size=size)


def normaliser(spec: InputSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std tensors shaped for [N,C,H,W], matching ``InputSpec.normalise``."""
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return mean, std


def resize(batch: torch.Tensor, size: int) -> torch.Tensor:
    """The evaluation view: the whole chip resized to the network input."""
    if batch.shape[-2:] == (size, size):
        return batch
    return F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True,
                         align_corners=False)


def build_model(info: RunInfo, pretrained: bool) -> TerratileNet:
    """The network described by ``info`` (weights still to be loaded or trained)."""
    spec = info.input_spec
    bb = build_backbone(info.backbone, len(spec.bands), pretrained, spec.size)
    return TerratileNet(bb.module, bb.feature_dim, len(info.classes), info.embedding_dim)


def load_trained(run_dir: Path) -> tuple[RunInfo, TerratileNet]:
    """A finished run's description and its network with trained weights, in eval mode."""
    info = RunInfo.load(run_dir)
    ckpt = Path(run_dir) / CHECKPOINT
    if not ckpt.is_file():
        raise DataError(f"{run_dir}: no {CHECKPOINT}")
    model = build_model(info, pretrained=False)
    model.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=True)["model"])
    return info, model.eval()


def _source_size(dataset: DataSet, image_size: int) -> int:
    """Chips are kept at their native size (bounded to 1..2x the input) for multi-scale crops."""
    array, _ = read_chip(dataset.samples[0].path)
    return int(min(max(min(array.shape[-2:]), image_size), 2 * image_size))


def _schedule(total_steps: int, warmup_steps: int) -> Any:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def _targets(labels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(labels.astype(np.int64 if labels.ndim == 1 else np.float32))


@torch.no_grad()
def predict(model: TerratileNet, images: np.ndarray, spec: InputSpec,
            batch_size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Torch features, logits and embeddings of value-range chips (eval view)."""
    model.eval()
    mean, std = normaliser(spec)
    outs: list[tuple[torch.Tensor, ...]] = []
    for start in range(0, len(images), batch_size):
        x = resize(torch.from_numpy(images[start : start + batch_size]), spec.size)
        outs.append(model((x * spec.scale - mean) / std))
    return tuple(torch.cat([o[i] for o in outs]).numpy() for i in range(3))  # type: ignore[return-value]


def _val_score(logits: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy (single-label) or micro-F1 at 0.5 (multi-label) on the validation split."""
    if labels.ndim == 1:
        return float((logits.argmax(1) == labels).mean())
    pred = logits > 0
    tp = float((pred & (labels > 0)).sum())
    return 2 * tp / max(float(pred.sum() + (labels > 0).sum()), 1.0)


def train(cfg: TrainConfig, console: Console | None = None) -> Path:
    """Train per ``cfg``; returns the run directory holding checkpoint, metrics and split."""
    console = console or Console(stderr=True)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    dataset = scan(cfg.data, cfg.task)
    train_idx, val_idx = stratified_split(dataset, cfg.val_fraction, cfg.seed)
    cfg.out.mkdir(parents=True, exist_ok=True)
    save_split(cfg.out, dataset, train_idx, val_idx)
    console.print(f"{len(dataset.samples)} chips, {len(dataset.classes)} classes "
                  f"({len(train_idx)} train / {len(val_idx)} val), backbone {cfg.backbone}")

    chips = load_chips(dataset, _source_size(dataset, cfg.image_size))
    labels = dataset.label_array()
    bb = build_backbone(cfg.backbone, len(chips.bands), cfg.pretrained and cfg.init is None,
                        cfg.image_size)
    spec = input_spec(chips, bb.mean, bb.std, cfg.image_size)
    info = RunInfo(cfg.backbone, dataset.task, dataset.classes, spec.model_dump(mode="json"),
                   bb.feature_dim, cfg.embedding_dim,
                   {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
                   gsd=cfg.gsd if cfg.gsd is not None else measured_gsd(dataset))
    model = TerratileNet(bb.module, bb.feature_dim, len(dataset.classes), cfg.embedding_dim)
    if cfg.init is not None:
        _init_from(model, cfg.init, console)
    proxy = ProxyLoss(len(dataset.classes), cfg.embedding_dim)
    if cfg.freeze_backbone:
        model.backbone.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad] + list(proxy.parameters())
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    steps_per_epoch = max(1, math.ceil(len(train_idx) / cfg.batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, _schedule(cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)))
    mean, std = normaliser(spec)
    gen = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, Any]] = []
    started, cpu_started = time.perf_counter(), time.process_time()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                  console=console) as progress:
        for epoch in range(1, cfg.epochs + 1):
            model.train()
            if cfg.freeze_backbone:
                model.backbone.eval()  # frozen BatchNorm statistics too
            bar = progress.add_task(f"epoch {epoch}/{cfg.epochs}", total=steps_per_epoch,
                                    status="")
            order = torch.randperm(len(train_idx), generator=gen).numpy()
            total_loss, seen, t0 = 0.0, 0, time.perf_counter()
            for step in range(steps_per_epoch):
                batch = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                rows = np.asarray(train_idx)[batch]
                x = augment(torch.from_numpy(chips.images[rows]), cfg.image_size, gen)
                y = _targets(labels[rows])
                _, logits, emb = model((x * spec.scale - mean) / std)
                if y.ndim == 1:
                    loss = F.cross_entropy(logits, y, label_smoothing=0.1)
                else:
                    loss = F.binary_cross_entropy_with_logits(logits, y)
                loss = loss + cfg.proxy_weight * proxy(emb, y)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                sched.step()
                total_loss += float(loss.detach()) * len(rows)
                seen += len(rows)
                progress.update(bar, advance=1, status=f"loss {total_loss / seen:.3f}")
            record: dict[str, Any] = {
                "epoch": epoch, "train_loss": total_loss / max(seen, 1),
                "lr": optim.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - t0,
            }
            if val_idx:
                _, val_logits, _ = predict(model, chips.images[val_idx], spec)
                record["val_score"] = _val_score(val_logits, labels[val_idx])
            record["elapsed_seconds"] = time.perf_counter() - started
            history.append(record)
            progress.update(bar, status=f"loss {record['train_loss']:.3f} "
                                        f"val {record.get('val_score', float('nan')):.3f}")
            torch.save({"model": model.state_dict(), "epoch": epoch}, cfg.out / CHECKPOINT)
            info.save(cfg.out)
            atomic_write_text(cfg.out / METRICS, json.dumps(
                {"epochs": history, "train_seconds": time.perf_counter() - started,
                 "cpu_seconds": time.process_time() - cpu_started}, indent=2))
    return cfg.out


def _init_from(model: TerratileNet, run_dir: Path, console: Console) -> None:
    """Start from a previous run: its backbone always, its heads when the classes match."""
    state = torch.load(Path(run_dir) / CHECKPOINT, map_location="cpu", weights_only=True)["model"]
    own = model.state_dict()
    keep = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(keep, strict=False)
    skipped = sorted(set(own) - set(keep))
    console.print(f"initialised from {run_dir} ({len(keep)} tensors"
                  + (f"; new: {', '.join(s.split('.')[0] for s in skipped[:3])}…)" if skipped
                     else ")"))
