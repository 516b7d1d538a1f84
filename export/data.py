"""Training data: an ImageFolder tree or a multi-label CSV, split by class.

Training streams chips from disk (``export.streaming``); ``load_chips`` decodes a bounded
set into memory for the steps that need arrays (bundle parity and calibration chips,
evaluation). Chips are decoded by the appliance's chip reader (``appliance.contract.chips``:
JPEG/PNG through Pillow, GeoTIFF chips of any band count through rasterio), the one the box
reads its reference images and image queries with. Every problem with the data (missing
folder, empty class, unreadable file, a single class, mixed band counts) raises
``DataError`` naming the offending path.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.contract import chips
from appliance.contract.bundle import Task
from appliance.contract.durable import atomic_write_text
from appliance.contract.image_files import IMAGE_SUFFIXES, is_image

SPLIT_FILE = "split.json"


class DataError(ValueError):
    """Training or evaluation data that cannot be used, with the path that is wrong."""


@dataclass(frozen=True)
class Sample:
    """One chip on disk and its labels (class indices; several for multi-label)."""

    path: Path
    labels: tuple[int, ...]


@dataclass(frozen=True)
class DataSet:
    """A labelled list of chips: classes in index order, the task, the band names."""

    root: Path
    classes: list[str]
    samples: list[Sample]
    task: Task

    def label_array(self) -> np.ndarray:
        """[N] int64 for single-label, [N,K] uint8 multi-hot for multi-label."""
        if self.task == "single-label":
            return np.asarray([s.labels[0] for s in self.samples], np.int64)
        out = np.zeros((len(self.samples), len(self.classes)), np.uint8)
        for i, s in enumerate(self.samples):
            out[i, list(s.labels)] = 1
        return out

    def subset(self, indices: list[int]) -> DataSet:
        return DataSet(self.root, self.classes, [self.samples[i] for i in indices], self.task)


def scan(data: Path, task: Task = "single-label") -> DataSet:
    """An ImageFolder directory (single-label) or a ``path,labels`` CSV / a directory holding
    ``labels.csv`` (multi-label, labels separated by ``|``)."""
    data = Path(data)
    if not data.exists():
        raise DataError(f"{data}: no such file or directory")
    if task == "multi-label":
        csv_path = data / "labels.csv" if data.is_dir() else data
        return _scan_csv(csv_path)
    if not data.is_dir():
        raise DataError(f"{data}: expected a directory with one sub-folder per class")
    class_dirs = sorted(p for p in data.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{data}: no class sub-folders (expected one folder per class)")
    samples: list[Sample] = []
    for k, folder in enumerate(class_dirs):
        files = sorted(p for p in folder.iterdir() if is_image(p))
        if not files:
            raise DataError(f"{folder}: empty class folder (no {sorted(IMAGE_SUFFIXES)} files)")
        samples += [Sample(f, (k,)) for f in files]
    if len(class_dirs) < 2:
        raise DataError(f"{data}: only one class ({class_dirs[0].name}); need at least two")
    return DataSet(data, [p.name for p in class_dirs], samples, "single-label")


def _scan_csv(csv_path: Path) -> DataSet:
    if not csv_path.is_file():
        raise DataError(f"{csv_path}: no such CSV (multi-label data is a 'path,labels' CSV)")
    rows: list[tuple[Path, list[str]]] = []
    with csv_path.open(newline="") as fh:
        for n, row in enumerate(csv.reader(fh), start=1):
            if not row or (n == 1 and row[0].strip().lower() == "path"):
                continue
            if len(row) != 2 or not row[1].strip():
                raise DataError(f"{csv_path}:{n}: expected 'path,label1|label2', got {row}")
            path = Path(row[0].strip())
            path = path if path.is_absolute() else csv_path.parent / path
            rows.append((path, [t.strip() for t in row[1].split("|") if t.strip()]))
    classes = sorted({name for _, names in rows for name in names})
    if len(classes) < 2:
        raise DataError(f"{csv_path}: only {len(classes)} label(s) {classes}; need at least two")
    index = {c: k for k, c in enumerate(classes)}
    samples = [Sample(p, tuple(sorted(index[c] for c in names))) for p, names in rows]
    return DataSet(csv_path.parent, classes, samples, "multi-label")


def read_chip(path: Path) -> tuple[np.ndarray, list[str]]:
    """A chip as [C,H,W] array (native dtype, native size) and its band names; an unreadable
    one is a ``DataError`` like every other problem with the data."""
    try:
        chip = chips.read_chip(path)
    except chips.ChipError as exc:
        raise DataError(str(exc)) from exc
    return chip.data, chip.bands


@dataclass(frozen=True)
class Chips:
    """Decoded chips of one data set, all resized to a common square size."""

    images: np.ndarray  # [N,C,S,S] float32, values in the source value range
    bands: list[str]
    value_range: tuple[float, float]


def load_chips(dataset: DataSet, size: int) -> Chips:
    """Decode every chip and resize it to ``size`` (bilinear, antialiased)."""
    import torch
    import torch.nn.functional as F

    images: list[np.ndarray] = []
    bands: list[str] | None = None
    dtype: np.dtype | None = None
    for sample in dataset.samples:
        array, names = read_chip(sample.path)
        if bands is None:
            bands, dtype = names, array.dtype
        elif len(names) != len(bands):
            raise DataError(f"{sample.path}: {len(names)} bands, the first chip had {len(bands)}")
        t = torch.from_numpy(array.astype(np.float32))[None]
        if t.shape[-2:] != (size, size):
            t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=True,
                              align_corners=False)
        images.append(t[0].numpy())
    if bands is None or dtype is None:
        raise DataError(f"{dataset.root}: no images")
    stack = np.stack(images).astype(np.float32)
    # 8-bit chips keep 0..255; other dtypes use the observed range of the training chips.
    value_range = (0.0, 255.0) if dtype == np.uint8 else (float(stack.min()), float(stack.max()))
    return Chips(stack, bands, value_range)


def stratified_split(dataset: DataSet, val_fraction: float,
                     seed: int) -> tuple[list[int], list[int]]:
    """Train and validation indices, ``val_fraction`` of each class held out (seeded).

    Multi-label samples are stratified by their first label.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, s in enumerate(dataset.samples):
        by_class.setdefault(s.labels[0], []).append(i)
    train: list[int] = []
    val: list[int] = []
    for k in sorted(by_class):
        idx = rng.permutation(by_class[k]).tolist()
        n_val = round(len(idx) * val_fraction) if val_fraction > 0 else 0
        if val_fraction > 0 and len(idx) > 1:
            n_val = min(max(n_val, 1), len(idx) - 1)
        val += idx[:n_val]
        train += idx[n_val:]
    return sorted(train), sorted(val)


def save_split(run_dir: Path, dataset: DataSet, train: list[int], val: list[int]) -> Path:
    """``split.json``: the exact files of each split, so evaluation uses the held-out chips."""
    out = run_dir / SPLIT_FILE
    doc = {
        "root": str(dataset.root.resolve()), "task": dataset.task, "classes": dataset.classes,
        "train": [_entry(dataset.samples[i], dataset.classes) for i in train],
        "val": [_entry(dataset.samples[i], dataset.classes) for i in val],
    }
    atomic_write_text(out, json.dumps(doc, indent=1))
    return out


def _entry(sample: Sample, classes: list[str]) -> dict[str, object]:
    return {"path": str(sample.path.resolve()), "labels": [classes[k] for k in sample.labels]}


def load_split(run_dir: Path, split: str) -> DataSet:
    """The ``train`` or ``val`` part of a run's ``split.json`` as a DataSet."""
    path = Path(run_dir) / SPLIT_FILE
    if not path.is_file():
        raise DataError(f"{path}: no split file (was this run trained by terratile-export?)")
    doc = json.loads(path.read_text())
    if split not in ("train", "val"):
        raise DataError(f"unknown split {split!r}; use 'train' or 'val'")
    classes: list[str] = doc["classes"]
    index = {c: k for k, c in enumerate(classes)}
    samples = [Sample(Path(e["path"]), tuple(index[c] for c in e["labels"])) for e in doc[split]]
    if not samples:
        raise DataError(f"{path}: the {split} split is empty")
    return DataSet(Path(doc["root"]), classes, samples, doc["task"])


def measured_gsd(dataset: DataSet, sample: int = 16) -> float | None:
    """The median ground sampling distance (m) of up to ``sample`` georeferenced chips of
    ``dataset``; None when its chips carry no georeferencing (JPEG/PNG, plain TIFFs)."""
    import rasterio
    from rasterio.errors import RasterioError

    from appliance.contract.gsd import scene_gsd

    step = max(1, len(dataset.samples) // sample)
    values = []
    for s in dataset.samples[::step][:sample]:
        if s.path.suffix.lower() not in (".tif", ".tiff"):
            continue
        try:
            with rasterio.open(s.path) as ds:
                if ds.crs is None or ds.transform.is_identity:
                    continue
                gsd = scene_gsd(ds.transform, ds.crs, ds.width, ds.height)
        except RasterioError:
            continue
        if gsd is not None:
            values.append(gsd)
    return float(np.median(values)) if values else None
