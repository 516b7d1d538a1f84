"""The entry log's shared rows: what every cell of one indexed scene has in common, once.

A scene's cells share its id (a 64-character hash), its file name, its CRS, its pixel →
CRS affine and the time it was indexed; a box holds thousands of cells per scene, so
repeating them on every cell made them most of the log's metadata (337 of 849 bytes per
cell at 1M cells). ``scenes`` holds them once under a small integer ``key`` that each entry
row refers to; the cells' bounds in the scene CRS are not stored at all but computed from
their windows and the scene's affine, the same arithmetic the pipeline uses
(``scene.cells.windows_bounds``). Class names, a few dozen strings repeated on millions
of rows, are stored once in ``names`` the same way.

Keys are ``AUTOINCREMENT`` and rows are never updated: a re-indexed scene gets a new key,
so a key names the same row forever and both tables can be cached in memory by key without
ever going stale, even when another connection (``terratile index add``) writes. Rows are
only cached once read back from the database, never on insert, so a rolled-back transaction
leaves no trace in the cache.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass

from appliance.scene.cells import Affine6

SCHEMA = """
CREATE TABLE IF NOT EXISTS scenes (
    key INTEGER PRIMARY KEY AUTOINCREMENT,
    scene_id TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    crs TEXT,
    transform TEXT,
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS scenes_ts ON scenes(ts);
CREATE TABLE IF NOT EXISTS names (key INTEGER PRIMARY KEY AUTOINCREMENT,
                                  name TEXT NOT NULL UNIQUE);
"""


@dataclass(frozen=True)
class SceneRow:
    """What every entry of one scene shares. ``transform``: the scene's pixel → CRS affine
    (a, b, c, d, e, f as in rasterio), ``None`` for entries without a window."""

    scene_id: str
    source: str
    crs: str | None
    transform: Affine6 | None
    ts: float


def create(db: sqlite3.Connection) -> None:
    """The two tables, if missing."""
    db.executescript(SCHEMA)


def encode_transform(transform: Affine6 | None) -> str | None:
    return None if transform is None else json.dumps([float(v) for v in transform])


def decode_transform(text: str | None) -> Affine6 | None:
    if text is None:
        return None
    a, b, c, d, e, f = (float(v) for v in json.loads(text))
    return (a, b, c, d, e, f)


class SceneTable:
    """Reads and writes ``scenes`` and ``names`` on the log's connection (the caller holds
    the log's lock and, for writes, its transaction)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._rows: dict[int, SceneRow] = {}
        self._names: dict[int, str] = {}

    def key(self, scene_id: str) -> int | None:
        """The key of ``scene_id``'s row, ``None`` if it is not indexed."""
        row = self._db.execute("SELECT key FROM scenes WHERE scene_id = ?",
                               (scene_id,)).fetchone()
        return None if row is None else int(row[0])

    def insert(self, row: SceneRow) -> int:
        """Add a scene's row (its old one must be gone); returns its new key."""
        cur = self._db.execute(
            "INSERT INTO scenes (scene_id, source, crs, transform, ts) VALUES (?, ?, ?, ?, ?)",
            (row.scene_id, row.source, row.crs, encode_transform(row.transform), row.ts))
        assert cur.lastrowid is not None  # set by every INSERT
        return cur.lastrowid

    def delete(self, key: int) -> None:
        self._db.execute("DELETE FROM scenes WHERE key = ?", (key,))

    def name_key(self, name: str) -> int:
        """The key of a class name, added if new."""
        self._db.execute("INSERT OR IGNORE INTO names (name) VALUES (?)", (name,))
        return int(self._db.execute("SELECT key FROM names WHERE name = ?",
                                    (name,)).fetchone()[0])

    def row(self, key: int) -> SceneRow:
        """The scene row under ``key`` (cached: rows never change)."""
        cached = self._rows.get(key)
        if cached is None:
            r = self._db.execute("SELECT scene_id, source, crs, transform, ts FROM scenes "
                                 "WHERE key = ?", (key,)).fetchone()
            if r is None:
                raise KeyError(key)
            cached = SceneRow(scene_id=r[0], source=r[1], crs=r[2],
                              transform=decode_transform(r[3]), ts=float(r[4]))
            self._rows[key] = cached
        return cached

    def name(self, key: int | None) -> str | None:
        """The class name under ``key`` (cached: names never change)."""
        if key is None:
            return None
        cached = self._names.get(key)
        if cached is None:
            r = self._db.execute("SELECT name FROM names WHERE key = ?", (key,)).fetchone()
            if r is None:
                raise KeyError(key)
            cached = self._names[key] = str(r[0])
        return cached
