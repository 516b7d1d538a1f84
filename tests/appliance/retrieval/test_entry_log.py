"""EntryLog: the SQLite log alone (no faiss): replacement, decoding, filters, cells, meta."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from appliance.retrieval.entry_log import (
    REFERENCE_PREFIX,
    Entry,
    EntryLog,
    Filters,
    IndexStateError,
)
from tests.helpers.outcomes import DIM, unit

CELL = Entry(scene_id="s1", source="s1.tif", window=(16, 32, 16, 16), crs="EPSG:32633",
             transform=(10.0, 0.0, 500000.0, 0.0, -10.0, 5000000.0),
             bounds_wgs84=(10.0016, 44.9952, 10.0032, 44.9968), class_name="water",
             confidence=0.75, label=None)
REF = Entry(scene_id=REFERENCE_PREFIX + "ab", source="water/lake.jpg", class_name="water",
            confidence=0.5, label="water")
T0 = 1_780_000_000.0


@pytest.fixture()
def entry_log(tmp_path: Path) -> EntryLog:
    return EntryLog(tmp_path / "index.sqlite", DIM)


def test_every_field_comes_back_by_name(entry_log: EntryLog) -> None:
    vectors = unit(np.random.default_rng(0), 2)
    old, new = entry_log.replace(["s1", REF.scene_id], [CELL, REF], vectors, T0)
    assert old.tolist() == [] and new.tolist() == [1, 2]
    got = entry_log.entries([2, 1, 99])
    assert set(got) == {1, 2}
    assert got[1] == (CELL, datetime.fromtimestamp(T0, timezone.utc))
    assert got[2][0] == REF  # no window, no bounds: None, not a box of Nones
    stored = vectors.astype(np.float16).astype(np.float32)  # kept as float16
    assert np.array_equal(entry_log.vector(2), stored[1])
    assert np.array_equal(entry_log.vectors(np.asarray([2, 1])), stored[::-1])
    with pytest.raises(KeyError):
        entry_log.vector(99)


def test_replace_deletes_the_scenes_rows_and_never_reuses_ids(entry_log: EntryLog) -> None:
    rng = np.random.default_rng(1)
    entry_log.replace(["s1"], [CELL] * 3, unit(rng, 3), T0)
    entry_log.replace(["s2"], [Entry(scene_id="s2", source="x")], unit(rng, 1), T0)
    old, new = entry_log.replace(["s1", "s1"], [CELL] * 2, unit(rng, 2), T0)
    assert old.tolist() == [1, 2, 3] and new.tolist() == [5, 6]
    old, new = entry_log.replace(["s2"], [], np.zeros((0, DIM), np.float32), T0)
    assert old.tolist() == [4] and new.tolist() == []
    assert sorted(entry_log.ids().tolist()) == [5, 6] and entry_log.count() == 2
    chunks = list(entry_log.iter_vectors(chunk=1))
    assert [c[0].tolist() for c in chunks] == [[5], [6]] and chunks[0][1].shape == (1, DIM)


def test_a_failed_replace_changes_nothing(entry_log: EntryLog) -> None:
    entry_log.replace(["s1"], [CELL], unit(np.random.default_rng(2), 1), T0)
    with pytest.raises(ValueError, match="shorter"):  # zip(strict=True): one vector missing
        entry_log.replace(["s1"], [CELL, CELL], unit(np.random.default_rng(3), 1), T0)
    assert entry_log.ids().tolist() == [1]


def test_filters_select_ids(entry_log: EntryLog) -> None:
    rng = np.random.default_rng(4)
    entry_log.replace(["s1"], [CELL], unit(rng, 1), T0)
    entry_log.replace(["s2"], [Entry(scene_id="s2", source="x", class_name="urban")],
                      unit(rng, 1), T0 + 3600)
    t = datetime.fromtimestamp(T0, timezone.utc)
    assert entry_log.ids(Filters(class_name="water")).tolist() == [1]
    assert entry_log.ids(Filters(scene_id="s2")).tolist() == [2]
    assert entry_log.ids(Filters(since=t + timedelta(minutes=1))).tolist() == [2]
    assert entry_log.ids(Filters(until=t)).tolist() == [1]
    naive = datetime(*t.timetuple()[:6])  # naive times are UTC
    assert entry_log.ids(Filters(until=naive)).tolist() == [1]
    assert entry_log.ids(Filters(scene_id="s1", class_name="urban")).tolist() == []
    assert not Filters(exclude_ids=frozenset({1})).restricts and Filters(scene_id="x").restricts


def test_find_cell_by_pixel_or_lonlat(entry_log: EntryLog) -> None:
    entry_log.replace(["s1"], [CELL], unit(np.random.default_rng(5), 1), T0)
    assert entry_log.find_cell("s1", pixel=(20.0, 40.0)) == 1
    assert entry_log.find_cell("s1", pixel=(32.0, 40.0)) is None  # windows are half-open
    assert entry_log.find_cell("s1", lonlat=(10.002, 44.996)) == 1
    assert entry_log.find_cell("s2", pixel=(20.0, 40.0)) is None
    with pytest.raises(ValueError, match="exactly one"):
        entry_log.find_cell("s1", pixel=(1.0, 1.0), lonlat=(1.0, 1.0))
    assert entry_log.has_scene("s1") and not entry_log.has_scene("s2")


def test_summary_counts_reference_images_apart(entry_log: EntryLog) -> None:
    rng = np.random.default_rng(6)
    entry_log.replace(["s1"], [CELL, CELL], unit(rng, 2), T0)
    entry_log.replace([REF.scene_id], [REF], unit(rng, 1), T0)
    entry_log.replace(["s3"], [Entry(scene_id="s3", source="x")], unit(rng, 1), T0)
    assert entry_log.summary() == {"entries": 4, "scenes": 2, "reference_images": 1,
                                   "classes": {"water": 3, "?": 1}}


def test_meta_and_the_embedding_size(tmp_path: Path) -> None:
    first = EntryLog(tmp_path / "i.sqlite", DIM)
    first.set_meta("checkpoint", {"max_id": 3})
    first.close()
    again = EntryLog(tmp_path / "i.sqlite", DIM)
    assert again.meta("checkpoint") == {"max_id": 3} and again.meta("missing") is None
    again.close()
    with pytest.raises(IndexStateError, match=f"holds {DIM}-d embeddings .* gives 16-d"):
        EntryLog(tmp_path / "i.sqlite", 16)


def test_commits_of_another_connection_are_noticed_once(tmp_path: Path) -> None:
    mine = EntryLog(tmp_path / "i.sqlite", DIM)
    mine.replace(["s1"], [CELL], unit(np.random.default_rng(7), 1), T0)
    assert not mine.changed_elsewhere()  # its own commits do not count
    other = sqlite3.connect(tmp_path / "i.sqlite")
    with other:
        other.execute("DELETE FROM entries")
    other.close()
    assert mine.changed_elsewhere() and not mine.changed_elsewhere()
    assert mine.count() == 0


def test_a_scene_is_stored_once_and_its_entries_must_agree(entry_log: EntryLog) -> None:
    rng = np.random.default_rng(9)
    entry_log.replace(["s1"], [CELL, CELL], unit(rng, 2), T0)
    with pytest.raises(ValueError, match="indexed already"):  # not named: not replaced
        entry_log.replace([], [CELL], unit(rng, 1), T0)
    moved = Entry(scene_id="s1", source="elsewhere.tif", window=CELL.window)
    with pytest.raises(ValueError, match="disagree"):
        entry_log.replace(["s1"], [CELL, moved], unit(rng, 2), T0)
    assert entry_log.ids().tolist() == [1, 2]
    assert entry_log.entries([1])[1][0].bounds == (500160.0, 4999520.0, 500320.0, 4999680.0)
