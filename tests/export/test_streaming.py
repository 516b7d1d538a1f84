"""Streaming chips: read lazily (memory does not grow with the data set), any band count,
the same augmented views with any number of workers, bad chips as one clear error."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from export.data import DataError, DataSet, scan
from export.streaming import ChipStream, batches, chip_statistics, loader
from tests.helpers.chips import write_geotiff_chips
from tests.helpers.torch_bundle import write_colour_chips


def _rss() -> int:
    """This process's resident set size in bytes (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE")


def _linked_chips(root: Path, per_class: int) -> Path:
    """``per_class`` chips per class, hard links to one 128 px PNG per class (fast to make;
    every one is still opened and decoded on its own)."""
    seed = write_colour_chips(root / "seed", per_class=1, size=128)
    data = root / "data"
    for png in sorted(seed.rglob("*.png")):
        folder = data / png.parent.name
        folder.mkdir(parents=True)
        for i in range(per_class):
            os.link(png, folder / f"{i:05d}.png")
    return data


@pytest.mark.skipif(not Path("/proc/self/statm").is_file(), reason="needs Linux /proc")
def test_memory_does_not_grow_with_the_number_of_chips(tmp_path: Path) -> None:
    small = scan(_linked_chips(tmp_path / "small", 40))
    large = scan(_linked_chips(tmp_path / "large", 1000))
    held = len(large.samples) * 3 * 128 * 128 * 4  # what decoding them all would hold: 590 MB

    def peak(dataset: DataSet) -> int:
        stream = ChipStream(dataset, 96, 3, train=True)
        top, seen = 0, 0
        for x, _ in batches(loader(stream, 24, workers=0)):  # 24 divides both: no tail
            seen += len(x)
            top = max(top, _rss())
        assert seen == len(stream)
        return top

    peak(small)  # warm-up: allocator pools, torch kernels
    base = peak(small)
    grown = peak(large) - base
    assert held > 500e6
    assert grown < 40e6, f"RSS grew {grown / 1e6:.0f} MB over {len(large.samples)} chips"


def test_views_are_the_same_with_any_number_of_workers(tmp_path: Path) -> None:
    ds = scan(write_colour_chips(tmp_path / "d", per_class=4, size=40))
    stream = ChipStream(ds, 32, 3, train=True, seed=7)
    stream.epoch = 2
    inline = torch.cat([x for x, _ in batches(loader(stream, 4, workers=0))])
    pooled = torch.cat([x for x, _ in batches(loader(stream, 4, workers=2))])
    assert inline.shape == (12, 3, 32, 32) and torch.equal(inline, pooled)
    stream.epoch = 3
    assert not torch.equal(inline, torch.cat([x for x, _ in loader(stream, 4, workers=0)]))
    val = ChipStream(ds, 32, 3, train=False)
    x, y = val[0]
    assert x.shape == (3, 32, 32) and int(y) == 0


def test_statistics_of_four_band_geotiffs(tmp_path: Path) -> None:
    ds = scan(write_geotiff_chips(tmp_path / "g"))
    stats = chip_statistics(ds, workers=2)
    assert stats.bands == ["band0", "band1", "band2", "band3"]
    assert stats.value_range == (0.0, 255.0) and stats.mean is not None and stats.std is not None
    from export.data import load_chips

    images = load_chips(ds, 16).images.astype(np.float64)  # the in-memory reference
    assert np.allclose(stats.mean, images.mean(axis=(0, 2, 3)), rtol=0.02)
    chips = ChipStream(ds, 24, 4, train=True)
    x, _ = next(iter(loader(chips, 6, workers=0)))
    assert x.shape == (6, 4, 24, 24) and x.dtype == torch.float32
    rgb = chip_statistics(scan(write_colour_chips(tmp_path / "c", per_class=2)), workers=0)
    assert rgb.value_range == (0.0, 255.0) and rgb.mean is None  # the weights' own apply


def test_a_bad_chip_found_by_a_worker_is_one_clear_error(tmp_path: Path) -> None:
    data = write_colour_chips(tmp_path / "d", per_class=3, size=32)
    (data / "water" / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    ds = scan(data)
    for workers in (0, 2):
        with pytest.raises(DataError) as info:
            for _ in batches(loader(ChipStream(ds, 32, 3, train=False), 4, workers)):
                pass
        message = str(info.value)
        assert message.startswith(str(data / "water" / "bad.jpg")), message
        assert "unreadable image" in message and "Traceback" not in message
