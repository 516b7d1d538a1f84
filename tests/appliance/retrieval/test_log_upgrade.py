"""An entry log of the layout before the scene table is converted when opened, losing nothing."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from appliance.retrieval.entry_log import Entry, EntryLog, Filters
from tests.helpers.outcomes import DIM, unit

# layout 3: every field on every row, float16 vectors in their own table
_LAYOUT_3 = """
CREATE TABLE entries (id INTEGER PRIMARY KEY AUTOINCREMENT, scene_id TEXT NOT NULL,
    source TEXT NOT NULL, col INTEGER, row INTEGER, width INTEGER, height INTEGER,
    crs TEXT, minx REAL, miny REAL, maxx REAL, maxy REAL, lon_min REAL, lat_min REAL,
    lon_max REAL, lat_max REAL, class TEXT, confidence REAL, label TEXT, ts REAL NOT NULL,
    labels TEXT);
CREATE INDEX entries_scene ON entries(scene_id);
CREATE INDEX entries_class ON entries(class);
CREATE INDEX entries_ts ON entries(ts);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE vectors (id INTEGER PRIMARY KEY, vector BLOB NOT NULL);
CREATE TRIGGER entries_drop_vector AFTER DELETE ON entries
BEGIN DELETE FROM vectors WHERE id = OLD.id; END;
"""
_INSERT = ("INSERT INTO entries (id, scene_id, source, col, row, width, height, crs, minx, "
           "miny, maxx, maxy, lon_min, lat_min, lon_max, lat_max, class, confidence, label, "
           "ts, labels) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)")


def _old_log(path: Path, vectors: np.ndarray) -> list[tuple[object, ...]]:
    """A layout-3 log: a north-up scene of 3 cells (10 m), a skewed one, a reference image;
    the highest id (9) was deleted, so the next id must be 10."""
    rows: list[tuple[object, ...]] = []
    for i, (col, row) in enumerate([(0, 0), (16, 0), (0, 16)]):
        minx, maxy = 500_000.0 + col * 10, 5_000_000.0 - row * 10
        rows.append((i + 1, "north", "north.tif", col, row, 16, 16, "EPSG:32633", minx,
                     maxy - 160, minx + 160, maxy, 10 + i, 45.0, 10.1 + i, 45.1,
                     ["water", "urban", "water"][i], 0.5 + i / 10, None, 100.0, None))
    rows.append((4, "skew", "skew.tif", 0, 0, 16, 16, "EPSG:32633", 0.0, 0.0, 160.0, 160.0,
                 1.0, 2.0, 3.0, 4.0, "urban", 0.9, None, 200.0, "|a|b|"))
    rows.append((5, "skew", "skew.tif", 16, 0, 16, 16, "EPSG:32633", 170.0, 0.0, 330.0, 161.0,
                 1.0, 2.0, 3.0, 4.0, "urban", 0.9, None, 200.0, None))
    rows.append((6, "ref:ab", "water/lake.jpg", None, None, None, None, None, None, None,
                 None, None, None, None, None, None, "water", 0.7, "water", 300.0, None))
    db = sqlite3.connect(path)
    db.executescript(_LAYOUT_3)
    db.execute("INSERT INTO meta VALUES ('dim', ?)", (str(DIM),))
    db.executemany(_INSERT, rows)
    db.executemany("INSERT INTO vectors VALUES (?, ?)",
                   [(r[0], v.astype(np.float16).tobytes()) for r, v in zip(rows, vectors,
                                                                          strict=True)])
    db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('entries', 9) "
               "ON CONFLICT DO NOTHING")
    db.execute("UPDATE sqlite_sequence SET seq = 9 WHERE name = 'entries'")
    db.commit()
    db.close()
    return rows


def test_every_entry_keeps_its_id_fields_and_vector(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    vectors = unit(np.random.default_rng(0), 6)
    rows = _old_log(path, vectors)
    log = EntryLog(path, DIM)
    got = log.entries(range(1, 10))
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    for r in rows:
        entry, ts = got[int(r[0])]  # type: ignore[call-overload]
        assert (entry.scene_id, entry.source, entry.crs) == (r[1], r[2], r[7])
        assert entry.window == (None if r[3] is None else tuple(r[3:7]))
        assert entry.bounds_wgs84 == (None if r[12] is None else tuple(r[12:16]))
        assert (entry.class_name, entry.confidence, entry.label) == (r[16], r[17], r[18])
        assert ts == datetime.fromtimestamp(r[19], timezone.utc)  # type: ignore[arg-type]
    for i in (1, 2, 3):  # the north-up scene's bounds come back from its affine, exactly
        assert got[i][0].bounds == tuple(rows[i - 1][8:12])
    assert got[4][0].bounds is None and got[5][0].bounds is None  # no grid fits: dropped
    assert got[4][0].labels == ("a", "b")
    assert np.array_equal(log.vectors(np.arange(1, 7)),
                          vectors.astype(np.float16).astype(np.float32))
    assert log.ids(Filters(class_name="urban")).tolist() == [2, 4, 5]
    assert log.ids(Filters(scene_id="skew")).tolist() == [4, 5]
    _, new = log.replace(["north"], [Entry("north", "north.tif")], unit(
        np.random.default_rng(1), 1), ts=400.0)
    assert new.tolist() == [10]  # the old high-water mark holds: ids are never reused
    assert log.summary() == {"entries": 4, "scenes": 2, "reference_images": 1,
                             "classes": {"urban": 2, "water": 1, "?": 1}}
    log.close()
    EntryLog(path, DIM).close()  # opening a converted log again changes nothing


def test_deleting_a_converted_entry_still_deletes_its_vector(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    _old_log(path, unit(np.random.default_rng(2), 6))
    log = EntryLog(path, DIM)
    old, _ = log.replace(["skew"], [], np.zeros((0, DIM), np.float32), ts=1.0)
    assert old.tolist() == [4, 5]
    with pytest.raises(KeyError):
        log.vector(4)
    log.close()
