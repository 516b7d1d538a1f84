"""Chips read on the fly: a torch ``Dataset`` over the files, decoded in loader workers.

Nothing of the pixels is kept between steps, so memory is bounded by the batch and the
workers' prefetch, not by the size of the data set: a few hundred thousand chips train like
a few thousand. Each item is one chip read by the appliance's chip reader (JPEG/PNG, or
GeoTIFF of any band count and dtype, any size), turned into float32, and either augmented
(training view: multi-scale crop + dihedral, ``export.augment``) or resized whole
(evaluation view) to the network input. A chip's augmentation is seeded by
(seed, epoch, index), so it does not depend on the worker, the rank or a resume.

``chip_statistics`` looks at the data before training: band names and dtype from the
first chip and, unless the chips are 8-bit RGB (the weights' own normalisation applies),
per-band mean/std and the value range over an evenly spaced sample of at most
``STATS_SAMPLE`` chips, computed in the workers so pixels never pile up.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from export.augment import augment, resize
from export.data import DataError, DataSet, read_chip

STATS_SAMPLE = 4096


@dataclass(frozen=True)
class ChipStats:
    """What the network's input spec needs to know about the chips."""

    bands: list[str]
    value_range: tuple[float, float]
    mean: list[float] | None  # per band; None for 8-bit RGB (the weights' own apply)
    std: list[float] | None


class ChipStream(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Chips of ``dataset`` as (float32 [C,S,S] tensor in the source value range, target);
    training views crop ``crops`` (area fraction range) of each chip."""

    def __init__(self, dataset: DataSet, size: int, n_bands: int, train: bool,
                 seed: int = 0, crops: tuple[float, float] = (0.35, 1.0)) -> None:
        self.paths = [s.path for s in dataset.samples]
        self.targets = torch.from_numpy(dataset.label_array())
        if self.targets.ndim == 2:
            self.targets = self.targets.float()
        self.size, self.n_bands, self.train, self.seed = size, n_bands, train, seed
        self.crops = crops
        self.epoch = 0  # set before each epoch; workers get a fresh copy every epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        chip = torch.from_numpy(_read(self.paths[index], self.n_bands).astype(np.float32))
        if self.train:
            g = torch.Generator().manual_seed(
                (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index)
            chip = augment(chip, self.size, g, self.crops)
        else:
            chip = resize(chip, self.size)
        return chip, self.targets[index]


def _read(path: Any, n_bands: int | None) -> np.ndarray:
    array, names = read_chip(path)
    if n_bands is not None and len(names) != n_bands:
        raise DataError(f"{path}: {len(names)} bands, the first chip had {n_bands}")
    return array


def loader(stream: ChipStream, batch_size: int, workers: int,
           sampler: Sampler[Any] | None = None, pin_memory: bool = False) -> DataLoader[Any]:
    """Batches of ``stream`` decoded by ``workers`` processes (0: in this process).

    A training loader drops the short last batch once there is at least one full one (a
    batch of one chip breaks BatchNorm; shuffling shows the dropped chips next epoch)."""
    shard = len(sampler) if sampler is not None and hasattr(sampler, "__len__") \
        else len(stream)
    return DataLoader(stream, batch_size=batch_size, sampler=sampler, num_workers=workers,
                      pin_memory=pin_memory, drop_last=stream.train and shard >= batch_size,
                      prefetch_factor=2 if workers else None)


def batches(source: DataLoader[Any]) -> Iterator[Any]:
    """``source``'s batches; a bad chip found by a worker is one plain ``DataError``."""
    try:
        yield from source
    except DataError as exc:
        raise DataError(_worker_message(str(exc))) from None


def _worker_message(text: str) -> str:
    """The original message of an error a loader worker re-raised with its traceback."""
    if not text.startswith("Caught "):
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split("DataError: ", 1)[-1]


class _Moments(Dataset[dict[str, Any]]):
    """Per-band sums of one chip, computed where it is decoded (a loader worker)."""

    def __init__(self, paths: Sequence[Any], n_bands: int) -> None:
        self.paths, self.n_bands = paths, n_bands

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        a = _read(self.paths[index], self.n_bands).astype(np.float64)
        flat = a.reshape(a.shape[0], -1)
        return {"sum": flat.sum(1), "sq": (flat**2).sum(1), "n": flat.shape[1],
                "min": float(a.min()), "max": float(a.max())}


def chip_statistics(dataset: DataSet, workers: int, sample: int = STATS_SAMPLE) -> ChipStats:
    """Bands, value range and (unless 8-bit RGB) per-band mean/std of ``dataset``'s chips."""
    if not dataset.samples:
        raise DataError(f"{dataset.root}: no images")
    first, bands = read_chip(dataset.samples[0].path)
    eight_bit = first.dtype == np.uint8
    if eight_bit and len(bands) == 3:
        return ChipStats(bands, (0.0, 255.0), None, None)
    step = max(1, len(dataset.samples) // sample)
    paths = [s.path for s in dataset.samples[::step][:sample]]
    total = np.zeros(len(bands))
    sq = np.zeros(len(bands))
    n, lo, hi = 0, np.inf, -np.inf
    source = DataLoader(_Moments(paths, len(bands)), batch_size=None, num_workers=workers)
    for m in batches(source):
        total += np.asarray(m["sum"])
        sq += np.asarray(m["sq"])
        n += int(m["n"])
        lo, hi = min(lo, float(m["min"])), max(hi, float(m["max"]))
    mean = total / n
    std = np.maximum(np.sqrt(np.maximum(sq / n - mean**2, 0.0)), 1e-6)
    # 8-bit chips keep 0..255; other dtypes use the observed range of the training chips.
    value_range = (0.0, 255.0) if eight_bit else (lo, hi)
    return ChipStats(bands, value_range, [float(v) for v in mean], [float(v) for v in std])
