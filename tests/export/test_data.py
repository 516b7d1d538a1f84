"""Data loading: ImageFolder / CSV / GeoTIFF chips, the stratified split, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from export.data import (
    DataError,
    load_chips,
    load_split,
    read_chip,
    save_split,
    scan,
    stratified_split,
)
from tests.helpers.chips import ALL_SUFFIXES, write_chip, write_geotiff_chips
from tests.helpers.torch_bundle import write_colour_chips


def test_imagefolder_scan_and_split(tmp_path: Path) -> None:
    data = write_colour_chips(tmp_path / "d", per_class=10)
    ds = scan(data)
    assert ds.classes == ["urban", "vegetation", "water"]
    assert len(ds.samples) == 30
    train, val = stratified_split(ds, 0.2, seed=0)
    assert not set(train) & set(val) and len(train) + len(val) == 30
    val_labels = ds.label_array()[val]
    assert np.bincount(val_labels).tolist() == [2, 2, 2]
    assert stratified_split(ds, 0.2, seed=0) == (train, val)
    assert stratified_split(ds, 0.2, seed=1) != (train, val)
    save_split(tmp_path, ds, train, val)
    held = load_split(tmp_path, "val")
    assert [s.path for s in held.samples] == [ds.samples[i].path.resolve() for i in val]


def test_geotiff_chips_of_four_bands(tmp_path: Path) -> None:
    ds = scan(write_geotiff_chips(tmp_path / "g"))
    chips = load_chips(ds, 16)
    assert chips.images.shape == (18, 4, 16, 16)
    assert chips.bands == ["band0", "band1", "band2", "band3"]
    assert chips.value_range == (0.0, 255.0)


def test_multi_label_csv(tmp_path: Path) -> None:
    data = write_colour_chips(tmp_path / "d", per_class=2)
    csv = tmp_path / "labels.csv"
    csv.write_text("path,labels\n" + "".join(
        f"{p.relative_to(tmp_path)},{p.parent.name}|wet\n" if p.parent.name == "water" else
        f"{p.relative_to(tmp_path)},{p.parent.name}\n" for p in sorted(data.rglob("*.png"))))
    ds = scan(csv, "multi-label")
    assert ds.classes == ["urban", "vegetation", "water", "wet"]
    hot = ds.label_array()
    assert hot.shape == (6, 4) and hot[:, 3].sum() == 2 and (hot[hot[:, 3] == 1, 2] == 1).all()


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such file or directory"):
        scan(tmp_path / "nope")


def test_empty_class_folder(tmp_path: Path) -> None:
    data = write_colour_chips(tmp_path / "d", per_class=2)
    (data / "zz_empty").mkdir()
    with pytest.raises(DataError, match=r"zz_empty: empty class folder"):
        scan(data)


def test_only_one_class(tmp_path: Path) -> None:
    data = write_colour_chips(tmp_path / "d", per_class=2, classes=("water",))
    with pytest.raises(DataError, match="only one class"):
        scan(data)


def test_unreadable_image(tmp_path: Path) -> None:
    data = write_colour_chips(tmp_path / "d", per_class=2)
    bad = data / "urban" / "broken.png"
    bad.write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"broken\.png: unreadable image"):
        load_chips(scan(data), 16)


def test_bad_csv_row(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("a.png,water\nb.png\n")
    with pytest.raises(DataError, match=r"labels\.csv:2"):
        scan(csv, "multi-label")


@pytest.mark.parametrize("suffix", ALL_SUFFIXES)
def test_every_chip_suffix_is_read(suffix: str, tmp_path: Path) -> None:
    """The appliance's one suffix list (contract.image_files) is what the exporter reads."""
    path = write_chip(tmp_path / "blue" / f"chip{suffix}", (30, 30, 200))
    write_chip(tmp_path / "red" / f"chip{suffix}", (200, 30, 30))
    assert [s.path for s in scan(tmp_path).samples if s.labels == (0,)] == [path]
    array, _ = read_chip(path)
    assert array.shape == (3, 40, 40)
    assert np.abs(array.reshape(3, -1).mean(axis=1) - [30, 30, 200]).max() < 8  # JPEG: lossy
