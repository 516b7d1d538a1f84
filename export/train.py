"""``terratile-export train``: fine-tune a backbone with a classifier and an embedding head.

Recipe (Risojević & Stojnić; SF300): ImageNet init (or ``--init`` a previous run for a
second, domain-adaptive round), multi-scale crops (nearly whole chips for multi-label,
``CROP_SCALE``) + dihedral augmentation, AdamW with a
linear warm-up and cosine decay (torch's own schedulers), cross-entropy on the classifier
plus a normalised-softmax proxy loss on the L2-normalised embedding.

It runs where it is told (``export.device``: CPU, CUDA, MPS; fp32 or mixed precision), on
one process or many (``export.distributed``: ``torchrun`` + DDP), reading chips on the fly
(``export.streaming``). The run directory holds ``split.json`` (the seeded stratified
split), ``run.json``, ``checkpoint.pt`` (the best epoch by validation score: what
``bundle`` exports), ``last.pt`` (the full training state after the latest epoch: model,
optimiser, scheduler, loss scaler, RNG; ``--resume`` continues from it), ``metrics.json``
and ``log.csv`` (one row per epoch; TensorBoard events in ``tensorboard/`` when it is
installed).
"""

from __future__ import annotations

import csv
import io
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from appliance.contract.bundle import InputSpec, Task
from appliance.contract.durable import atomic_write_text
from export import distributed
from export.augment import resize
from export.backbones import build_backbone
from export.data import DataError, DataSet, measured_gsd, save_split, scan, stratified_split
from export.device import Accelerator, accelerator
from export.distributed import Cluster
from export.model import ProxyLoss, TerratileNet
from export.streaming import ChipStats, ChipStream, batches, chip_statistics, loader

# Crop areas of the training views. A multi-label chip's labels describe the whole chip, so
# its crops keep nearly all of it (a 35 % crop of a residential chip can lose its cars: label
# noise); single-label scenes keep their class in a crop.
CROP_SCALE = {"single-label": (0.35, 1.0), "multi-label": (0.8, 1.0)}
RUN_FILE = "run.json"
CHECKPOINT = "checkpoint.pt"
LAST = "last.pt"
METRICS = "metrics.json"
LOG = "log.csv"
LOG_FIELDS = ("epoch", "train_loss", "val_score", "lr", "epoch_seconds", "elapsed_seconds")


@dataclass
class TrainConfig:
    """Everything ``train`` needs; saved as ``run.json`` next to the checkpoint."""

    data: Path
    backbone: str
    out: Path
    epochs: int = 8
    image_size: int | None = 128  # None: the backbone's native input size
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
    crop_min: float | None = None  # smallest crop area of a training view (None: CROP_SCALE)
    device: str = "auto"  # auto | cpu | cuda[:N] | mps
    precision: str = "32"  # 32 | 16-mixed | bf16-mixed
    workers: int = 2  # data-loader processes decoding chips (0: the training process)
    resume: bool = False  # continue from last.pt in ``out``
    patience: int = 0  # stop after this many epochs without a better val score (0: never)


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


def input_spec(stats: ChipStats, backbone_mean: list[float], backbone_std: list[float],
               size: int) -> InputSpec:
    """The weights' own normalisation for 8-bit RGB; per-band data statistics otherwise."""
    mean = stats.mean if stats.mean is not None else backbone_mean
    std = stats.std if stats.std is not None else backbone_std
    return InputSpec(bands=stats.bands, value_range=stats.value_range, scale=1.0,
                     mean=mean, std=std, size=size)


def normaliser(spec: InputSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std tensors shaped for [N,C,H,W], matching ``InputSpec.normalise``."""
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1)
    return mean, std


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


class Objective(nn.Module):
    """Network plus proxy loss as one module, so DDP averages the proxies' gradients too."""

    def __init__(self, net: TerratileNet, proxy: ProxyLoss, proxy_weight: float,
                 spec: InputSpec) -> None:
        super().__init__()
        self.net, self.proxy, self.proxy_weight = net, proxy, proxy_weight
        mean, std = normaliser(spec)
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.scale = spec.scale

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x * self.scale - self.mean) / self.std

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, logits, emb = self.net(self.normalise(x))
        if y.ndim == 1:
            loss = F.cross_entropy(logits, y, label_smoothing=0.1)
        else:
            loss = F.binary_cross_entropy_with_logits(logits, y)
        return loss + self.proxy_weight * self.proxy(emb, y)


@dataclass
class Progression:
    """Where training stands after an epoch: what ``last.pt`` restores besides weights."""

    epoch: int = 0
    best_epoch: int = 0
    best_score: float = -1.0
    train_seconds: float = 0.0
    cpu_seconds: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)


def _scheduler(optim: torch.optim.Optimizer, total_steps: int,
               warmup_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warm-up then cosine decay to zero, per step."""
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optim, max(total_steps - warmup_steps, 1))
    if warmup_steps <= 0:
        return cosine
    warmup = torch.optim.lr_scheduler.LinearLR(optim, start_factor=1.0 / warmup_steps,
                                               total_iters=warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(optim, [warmup, cosine], [warmup_steps])


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state["numpy"] = (kind, torch.from_numpy(np.asarray(keys, np.int64)), pos, has_gauss, gauss)
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _write_logs(out: Path, progression: Progression, tb: Any) -> None:
    """``log.csv`` rewritten from the history (so it always matches ``last.pt``)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, LOG_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(progression.history)
    atomic_write_text(out / LOG, text.getvalue())
    if tb is not None:
        record = progression.history[-1]
        for key in LOG_FIELDS[1:]:
            if record.get(key) is not None:
                tb.add_scalar(key, record[key], record["epoch"])
        tb.flush()


def _tensorboard(out: Path) -> Any:
    """A TensorBoard writer when the package is installed, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(out / "tensorboard"))


def train(cfg: TrainConfig, console: Console | None = None) -> Path:
    """Train per ``cfg``; returns the run directory holding checkpoints, logs and split.

    Under ``torchrun`` every process calls this; rank 0 alone writes and prints.
    """
    cluster = distributed.from_env()
    acc = accelerator(cfg.device, cfg.precision, cluster.local_rank)
    distributed.start(cluster, acc.device)
    try:
        if not cluster.is_main:
            console = Console(quiet=True)
        return _train(cfg, console or Console(stderr=True), cluster, acc)
    finally:
        distributed.stop(cluster)


def _train(cfg: TrainConfig, console: Console, cluster: Cluster, acc: Accelerator) -> Path:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    dataset = scan(cfg.data, cfg.task)
    train_idx, val_idx = stratified_split(dataset, cfg.val_fraction, cfg.seed)
    if cfg.resume and not (cfg.out / LAST).is_file():
        raise DataError(f"{cfg.out}: nothing to resume (no {LAST})")
    if cluster.is_main:
        cfg.out.mkdir(parents=True, exist_ok=True)
        save_split(cfg.out, dataset, train_idx, val_idx)
    console.print(f"{len(dataset.samples)} chips, {len(dataset.classes)} classes "
                  f"({len(train_idx)} train / {len(val_idx)} val), backbone {cfg.backbone}, "
                  f"{acc.device} at {acc.precision}"
                  + (f", {cluster.world_size} processes" if cluster.distributed else ""))

    stats = chip_statistics(dataset.subset(train_idx), cfg.workers)
    bb = build_backbone(cfg.backbone, len(stats.bands), cfg.pretrained and cfg.init is None,
                        cfg.image_size)
    size = cfg.image_size or bb.native_size
    spec = input_spec(stats, bb.mean, bb.std, size)
    info = RunInfo(cfg.backbone, dataset.task, dataset.classes, spec.model_dump(mode="json"),
                   bb.feature_dim, cfg.embedding_dim,
                   {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
                   gsd=cfg.gsd if cfg.gsd is not None else measured_gsd(dataset))
    model = TerratileNet(bb.module, bb.feature_dim, len(dataset.classes), cfg.embedding_dim)
    if cfg.init is not None:
        _init_from(model, cfg.init, console)
    if cfg.freeze_backbone:
        model.backbone.requires_grad_(False)
    objective = Objective(model, ProxyLoss(len(dataset.classes), cfg.embedding_dim),
                          cfg.proxy_weight, spec).to(acc.device)
    if acc.channels_last:
        objective = objective.to(memory_format=torch.channels_last)
    torch.manual_seed(cfg.seed + cluster.rank)  # own dropout masks per rank

    crops = CROP_SCALE[dataset.task] if cfg.crop_min is None else (cfg.crop_min, 1.0)
    stream = ChipStream(dataset.subset(train_idx), size, len(stats.bands), train=True,
                        seed=cfg.seed, crops=crops)
    sampler: DistributedSampler[Any] = DistributedSampler(
        stream, num_replicas=cluster.world_size, rank=cluster.rank, shuffle=True, seed=cfg.seed)
    pin = acc.device.type == "cuda"
    # --batch-size is the global batch: each of N processes takes 1/N of it.
    train_loader = loader(stream, max(1, cfg.batch_size // cluster.world_size), cfg.workers,
                          sampler, pin)
    val_loader = loader(ChipStream(dataset.subset(val_idx[cluster.rank :: cluster.world_size]),
                                   size, len(stats.bands), train=False),
                        2 * cfg.batch_size, cfg.workers, pin_memory=pin) if val_idx else None
    params = [p for p in objective.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-4)
    steps_per_epoch = len(train_loader)
    sched = _scheduler(optim, cfg.epochs * steps_per_epoch,
                       round(cfg.warmup_epochs * steps_per_epoch))
    scaler = acc.scaler()
    progression = Progression()
    if cfg.resume:
        progression = _restore(cfg.out, cluster, objective, optim, sched, scaler, dataset)
        console.print(f"resuming after epoch {progression.epoch} (best so far: epoch "
                      f"{progression.best_epoch}, val {progression.best_score:.3f})")
    step: nn.Module = objective
    if cluster.distributed:
        step = DistributedDataParallel(
            objective, device_ids=[acc.device.index] if acc.device.type == "cuda" else None)
    tb = _tensorboard(cfg.out) if cluster.is_main else None
    started, cpu_started = time.perf_counter(), time.process_time()
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                  console=console, disable=console.quiet) as progress:
        for epoch in range(progression.epoch + 1, cfg.epochs + 1):
            sampler.set_epoch(epoch)
            stream.epoch = epoch
            objective.train()
            if cfg.freeze_backbone:
                model.backbone.eval()  # frozen BatchNorm statistics too
            bar = progress.add_task(f"epoch {epoch}/{cfg.epochs}", total=steps_per_epoch,
                                    status="")
            total_loss, seen, t0 = 0.0, 0, time.perf_counter()
            for x, y in batches(train_loader):
                with acc.autocast():
                    loss = step(acc.to_input(x), y.to(acc.device, non_blocking=pin))
                optim.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optim)
                scaler.update()
                sched.step()
                total_loss += float(loss.detach()) * len(y)
                seen += len(y)
                progress.update(bar, advance=1, status=f"loss {total_loss / seen:.3f}")
            losses = cluster.gather((total_loss, seen))
            record: dict[str, Any] = {
                "epoch": epoch,
                "train_loss": sum(t for t, _ in losses) / max(sum(n for _, n in losses), 1),
                "lr": optim.param_groups[0]["lr"], "epoch_seconds": time.perf_counter() - t0,
            }
            if val_loader is not None:
                record["val_score"] = _validate(objective, val_loader, acc, cluster)
            record["elapsed_seconds"] = progression.train_seconds + time.perf_counter() - started
            progression.history.append(record)
            progression.epoch = epoch
            score = record.get("val_score", float(epoch))  # no val split: the latest is best
            improved = score > progression.best_score
            if improved:
                progression.best_epoch, progression.best_score = epoch, score
            progress.update(bar, status=f"loss {record['train_loss']:.3f} "
                                        f"val {record.get('val_score', float('nan')):.3f}"
                                        + (" (best)" if improved else ""))
            rng = cluster.gather(_rng_state())
            if cluster.is_main:
                _save_epoch(cfg.out, info, model, objective, optim, sched, scaler, progression,
                            rng, improved, started, cpu_started)
                _write_logs(cfg.out, progression, tb)
            cluster.barrier()
            if cfg.patience and epoch - progression.best_epoch >= cfg.patience:
                console.print(f"early stop: no better val score for {cfg.patience} epochs; "
                              f"keeping epoch {progression.best_epoch}")
                break
    if tb is not None:
        tb.close()
    return cfg.out


@torch.no_grad()
def _validate(objective: Objective, source: Any, acc: Accelerator, cluster: Cluster) -> float:
    """The val score over all ranks' shards of the validation split."""
    objective.eval()
    logits, labels = [], []
    for x, y in batches(source):
        with acc.autocast():
            _, out, _ = objective.net(objective.normalise(acc.to_input(x)))
        logits.append(out.float().cpu().numpy())
        labels.append(y.numpy())
    shards = cluster.gather((np.concatenate(logits) if logits else None,
                             np.concatenate(labels) if labels else None))
    kept = [s for s in shards if s[0] is not None]
    return _val_score(np.concatenate([s[0] for s in kept]), np.concatenate([s[1] for s in kept]))


def _save_epoch(out: Path, info: RunInfo, model: TerratileNet, objective: Objective,
                optim: torch.optim.Optimizer, sched: Any, scaler: torch.amp.GradScaler,
                progression: Progression, rng: list[dict[str, Any]], improved: bool,
                started: float, cpu_started: float) -> None:
    """The best weights (``checkpoint.pt``), the full state (``last.pt``), ``metrics.json``."""
    wall = progression.train_seconds + time.perf_counter() - started
    cpu = progression.cpu_seconds + time.process_time() - cpu_started
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if improved:
        _atomic_save({"model": weights, "epoch": progression.epoch}, out / CHECKPOINT)
    info.save(out)
    _atomic_save({
        "objective": {k: v.detach().cpu() for k, v in objective.state_dict().items()},
        "optimizer": optim.state_dict(), "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(), "rng": rng, "classes": info.classes,
        "progression": {**asdict(progression), "train_seconds": wall, "cpu_seconds": cpu},
    }, out / LAST)
    best = progression.history[progression.best_epoch - 1]
    atomic_write_text(out / METRICS, json.dumps(
        {"epochs": progression.history, "best_epoch": progression.best_epoch,
         "best": best, "train_seconds": wall, "cpu_seconds": cpu}, indent=2))


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file, so a kill mid-write leaves the old one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def _restore(out: Path, cluster: Cluster, objective: Objective, optim: torch.optim.Optimizer,
             sched: Any, scaler: torch.amp.GradScaler, dataset: DataSet) -> Progression:
    """Load ``last.pt`` into the training state; returns where training stood."""
    state = torch.load(out / LAST, map_location="cpu", weights_only=True)
    if state["classes"] != dataset.classes:
        raise DataError(f"{out / LAST}: trained on classes {state['classes']}, the data has "
                        f"{dataset.classes}; resume with the same data")
    objective.load_state_dict(state["objective"])
    optim.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    _set_rng_state(rng[cluster.rank] if cluster.rank < len(rng) else rng[0])
    return Progression(**state["progression"])


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
