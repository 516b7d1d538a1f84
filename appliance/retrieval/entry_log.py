"""The durable entry log of the retrieval index: one SQLite row per indexed vector.

``state/index.sqlite`` (WAL, full synchronous commits) holds one row per indexed scene cell
or reference image: its own metadata in ``entries`` (window, lon/lat bounds, class,
confidence, labels), what it shares with the other cells of its scene once in ``scenes``
(``retrieval.scene_table``: scene id, file, CRS, affine, indexing time), and its vector, as
float16, in the ``vectors`` table (``retrieval.vector_table``), all written in the same
transaction. It is the index's source of truth; the faiss index is only a checkpoint of it
(``retrieval.index``). A cell's bounds in the scene CRS are computed from its window and
the scene's affine, not stored. A log of an earlier layout is brought to this one when it
is opened (``retrieval.log_upgrade``).

Ids are SQLite ``AUTOINCREMENT`` rowids: never reused, so an id names the same entry in the
log and in faiss forever, and reconciling the two is a set difference. ``replace`` deletes a
scene's rows and inserts its new ones in one transaction: a scene is replaced, never
duplicated, and a crash leaves either the old rows or the new ones. Reference images are
entries whose scene id starts with ``ref:`` (``REFERENCE_PREFIX``).

A multi-label bundle's rows also carry their label set (``labels``, stored as
``|a|b|`` so "has every one of these labels" is a substring test per label).

The ``meta`` table keeps the embedding size (a log of other-sized vectors is refused with
``IndexStateError``), the last checkpoint and the last recall check. Rows are decoded by
column name into ``Entry``. The owner (``TileIndex``) serialises access under its lock.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from appliance.contract.durable import open_sqlite, transaction
from appliance.retrieval import log_upgrade, scene_table, vector_table
from appliance.retrieval.scene_table import SceneRow, SceneTable
from appliance.scene.cells import Affine6, windows_bounds

REFERENCE_PREFIX = "ref:"
SQL_CHUNK = 900  # ids per ``IN (...)``: below SQLite's default limit of 999 variables
# A float16 vector row is ~326 bytes: 4 KiB pages hold 12 of them (4.5 % left empty),
# 8 KiB pages 25 (0.5 %); the page size of a new log, existing ones keep theirs.
PAGE_SIZE = 8192

Box = tuple[float, float, float, float]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    scene INTEGER NOT NULL,
    col INTEGER, row INTEGER, width INTEGER, height INTEGER,
    lon_min REAL, lat_min REAL, lon_max REAL, lat_max REAL,
    class INTEGER, confidence REAL, label TEXT, labels TEXT
);
CREATE INDEX IF NOT EXISTS entries_scene ON entries(scene);
CREATE INDEX IF NOT EXISTS entries_class ON entries(class);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_WINDOW = ("col", "row", "width", "height")
_BOUNDS_WGS84 = ("lon_min", "lat_min", "lon_max", "lat_max")
_COLUMNS = ("scene", *_WINDOW, *_BOUNDS_WGS84, "class", "confidence", "label", "labels")
_METADATA = ", ".join(("id", *_COLUMNS))
_INSERT = (f"INSERT INTO entries ({', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join(':' + c for c in _COLUMNS)})")


class IndexStateError(RuntimeError):
    """The index on disk cannot be used as configured (e.g. another embedding size)."""


@dataclass(frozen=True)
class Entry:
    """Metadata of one indexed vector: a scene cell or a reference image."""

    scene_id: str
    source: str
    window: tuple[int, int, int, int] | None = None
    crs: str | None = None
    transform: Affine6 | None = None  # the scene's pixel -> CRS affine (a, b, c, d, e, f)
    bounds_wgs84: Box | None = None
    class_name: str | None = None
    confidence: float | None = None
    label: str | None = None
    labels: tuple[str, ...] | None = None  # multi-label bundles: labels present in the cell

    @property
    def bounds(self) -> Box | None:
        """The window's bounds in the scene CRS, from the scene's affine."""
        if self.window is None or self.transform is None:
            return None
        return as_box(windows_bounds(np.asarray([self.window]), self.transform)[0])


@dataclass(frozen=True)
class Filters:
    """Restrictions on results; ``None`` fields do not filter. ``labels``: entries holding
    every one of these labels (multi-label bundles)."""

    class_name: str | None = None
    scene_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    exclude_ids: frozenset[int] = field(default_factory=frozenset)
    labels: frozenset[str] = field(default_factory=frozenset)

    @property
    def restricts(self) -> bool:
        """True when the allowed ids must come from the log (not just an exclusion)."""
        return bool(self.labels) or any(
            v is not None for v in (self.class_name, self.scene_id, self.since, self.until))

    def sql(self) -> tuple[str, list[Any]]:
        """A WHERE clause (without the keyword) and its parameters."""
        clauses, params = ["1"], []  # type: tuple[list[str], list[Any]]
        if self.class_name is not None:
            clauses.append("class = (SELECT key FROM names WHERE name = ?)")
            params.append(self.class_name)
        if self.scene_id is not None:
            clauses.append("scene = (SELECT key FROM scenes WHERE scene_id = ?)")
            params.append(self.scene_id)
        if self.since is not None:
            clauses.append("scene IN (SELECT key FROM scenes WHERE ts >= ?)")
            params.append(_epoch(self.since))
        if self.until is not None:
            clauses.append("scene IN (SELECT key FROM scenes WHERE ts <= ?)")
            params.append(_epoch(self.until))
        for name in sorted(self.labels):
            clauses.append("instr(labels, ?) > 0")
            params.append(f"|{name}|")
        return " AND ".join(clauses), params


class EntryLog:
    """The SQLite log of entries and their vectors (see the module docstring)."""

    def __init__(self, path: Path, dim: int) -> None:
        self.path = Path(path)
        self.dim = int(dim)
        self._db = open_sqlite(self.path, page_size=PAGE_SIZE)
        try:
            check = self._db.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise sqlite3.DatabaseError("; ".join(str(r[0]) for r in check[:5]))
            log_upgrade.upgrade(self._db, _SCHEMA)
            self._db.executescript(_SCHEMA)
            scene_table.create(self._db)
            vector_table.create(self._db)
        except sqlite3.DatabaseError:
            self._db.close()
            raise
        stored = self.meta("dim")
        if stored is None:
            self.set_meta("dim", self.dim)
        elif int(stored) != self.dim:
            raise IndexStateError(
                f"{self.path} holds {stored}-d embeddings but the model gives {self.dim}-d; "
                "move the index files aside to start a new index for this model")
        self._scenes = SceneTable(self._db)
        self._data_version = self._data_version_now()

    # ---------------------------------------------------------------- writing

    def replace(self, scene_ids: Sequence[str], entries: Sequence[Entry], vectors: np.ndarray,
                ts: float) -> tuple[np.ndarray, np.ndarray]:
        """One transaction: delete every row of ``scene_ids``, insert ``entries`` with their
        [n,dim] float32 ``vectors``, stamped ``ts``. Returns (deleted ids, new ids)."""
        old: list[int] = []
        new: list[int] = []
        with transaction(self._db) as db:
            for sid in dict.fromkeys(scene_ids):
                key = self._scenes.key(sid)
                if key is None:
                    continue
                old += [r[0] for r in db.execute("SELECT id FROM entries WHERE scene = ?",
                                                 (key,))]
                db.execute("DELETE FROM entries WHERE scene = ?", (key,))
                self._scenes.delete(key)
            keys: dict[str, tuple[int, SceneRow]] = {}
            names: dict[str, int] = {}
            for e, _ in zip(entries, vectors, strict=True):
                key = self._scene_key(e, ts, keys)
                if e.class_name is not None and e.class_name not in names:
                    names[e.class_name] = self._scenes.name_key(e.class_name)
                row = db.execute(_INSERT, _encode(e, key, names))
                assert row.lastrowid is not None  # set by every INSERT
                new.append(row.lastrowid)
            vector_table.insert(db, new, vectors)
        return np.asarray(old, np.int64), np.asarray(new, np.int64)

    def _scene_key(self, e: Entry, ts: float, keys: dict[str, tuple[int, SceneRow]]) -> int:
        """The key of ``e``'s scene row in this transaction: added with its first entry;
        every later entry of the scene must agree with it."""
        shared = SceneRow(scene_id=e.scene_id, source=e.source, crs=e.crs,
                          transform=e.transform, ts=ts)
        known = keys.get(e.scene_id)
        if known is None:
            if self._scenes.key(e.scene_id) is not None:
                raise ValueError(f"scene {e.scene_id!r} is indexed already: name it in "
                                 "scene_ids to replace it")
            known = keys[e.scene_id] = (self._scenes.insert(shared), shared)
        elif known[1] != shared:
            raise ValueError(f"the entries of scene {e.scene_id!r} disagree on its file, "
                             "CRS or affine")
        return known[0]

    def meta(self, key: str) -> Any:
        """A value of the meta table (JSON), ``None`` if unset."""
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                         (key, json.dumps(value)))

    def close(self) -> None:
        self._db.close()

    # ---------------------------------------------------------------- reading

    def changed_elsewhere(self) -> bool:
        """True once per commit of another connection (``terratile index add`` beside the
        daemon): SQLite's ``data_version`` moves only for other connections' commits."""
        version = self._data_version_now()
        changed, self._data_version = version != self._data_version, version
        return changed

    def count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def ids(self, filters: Filters | None = None) -> np.ndarray:
        """Ids of every entry that ``filters`` allow (all without)."""
        where, args = (filters or Filters()).sql()
        return np.fromiter((r[0] for r in self._db.execute(
            f"SELECT id FROM entries WHERE {where}", args)), np.int64)

    def sample_ids(self, n: int) -> np.ndarray:
        """Up to ``n`` ids drawn at random (training vectors for IVF-PQ)."""
        return np.fromiter((r[0] for r in self._db.execute(
            "SELECT id FROM entries ORDER BY RANDOM() LIMIT ?", (n,))), np.int64)

    def vector(self, entry_id: int) -> np.ndarray:
        """The stored vector of one entry (float32 from its float16 copy); ``KeyError`` if
        it does not exist (any more)."""
        vector = vector_table.one(self._db, entry_id)
        if vector is None:
            raise KeyError(entry_id)
        return vector

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """[len(ids), dim] vectors of ``ids``, in the order given (``KeyError``: one is gone)."""
        return vector_table.many(self._db, ids, self.dim)

    def iter_vectors(self, chunk: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(ids, [n,dim] vectors) of every entry in id order, ``chunk`` rows at a time."""
        return vector_table.iterate(self._db, self.dim, chunk)

    def entries(self, ids: Iterable[int]) -> dict[int, tuple[Entry, datetime]]:
        """Entry and time indexed of each of ``ids`` that still exists."""
        out: dict[int, tuple[Entry, datetime]] = {}
        cur = self._db.cursor()
        cur.row_factory = sqlite3.Row
        for part in _chunks(sorted({int(i) for i in ids})):
            marks = ",".join("?" * len(part))
            for r in cur.execute(f"SELECT {_METADATA} FROM entries WHERE id IN ({marks})", part):
                out[int(r["id"])] = self._decode(r)
        return out

    def find_cell(self, scene_id: str, pixel: tuple[float, float] | None = None,
                  lonlat: tuple[float, float] | None = None) -> int | None:
        """Id of the entry of ``scene_id`` whose window (pixel col,row) or WGS84 bounds
        (lon,lat) contain the point, the nearest centre if several; ``None`` if none."""
        if pixel is not None and lonlat is None:
            x, y = pixel
            sql = ("SELECT id, col + width / 2.0, row + height / 2.0 FROM entries "
                   "WHERE scene = ? AND col <= ? AND ? < col + width "
                   "AND row <= ? AND ? < row + height")
        elif lonlat is not None and pixel is None:
            x, y = lonlat
            sql = ("SELECT id, (lon_min + lon_max) / 2, (lat_min + lat_max) / 2 FROM entries "
                   "WHERE scene = ? AND lon_min <= ? AND ? <= lon_max "
                   "AND lat_min <= ? AND ? <= lat_max")
        else:
            raise ValueError("give exactly one of pixel or lonlat")
        key = self._scenes.key(scene_id)
        rows = [] if key is None else self._db.execute(sql, (key, x, x, y, y)).fetchall()
        if not rows:
            return None
        return int(min(rows, key=lambda r: (r[1] - x) ** 2 + (r[2] - y) ** 2)[0])

    def has_scene(self, scene_id: str) -> bool:
        key = self._scenes.key(scene_id)
        return key is not None and self._db.execute(
            "SELECT 1 FROM entries WHERE scene = ? LIMIT 1", (key,)).fetchone() is not None

    def summary(self) -> dict[str, Any]:
        """Entries, scenes, reference images and entries per class (``?``: none)."""
        db, refs = self._db, REFERENCE_PREFIX + "%"
        scenes = db.execute("SELECT COUNT(*) FROM scenes WHERE scene_id NOT LIKE ? "
                            "AND key IN (SELECT scene FROM entries)", (refs,)).fetchone()[0]
        references = db.execute("SELECT COUNT(*) FROM entries JOIN scenes ON scene = key "
                                "WHERE scene_id LIKE ?", (refs,)).fetchone()[0]
        classes = dict(db.execute("SELECT COALESCE(name, '?'), COUNT(*) FROM entries "
                                  "LEFT JOIN names ON class = names.key "
                                  "GROUP BY class ORDER BY 2 DESC").fetchall())
        return {"entries": self.count(), "scenes": int(scenes),
                "reference_images": int(references), "classes": classes}

    def _decode(self, r: sqlite3.Row) -> tuple[Entry, datetime]:
        scene = self._scenes.row(int(r["scene"]))
        window = None if r["col"] is None else (
            int(r["col"]), int(r["row"]), int(r["width"]), int(r["height"]))
        entry = Entry(scene_id=scene.scene_id, source=scene.source, window=window,
                      crs=scene.crs, transform=scene.transform,
                      bounds_wgs84=as_box([r[n] for n in _BOUNDS_WGS84]),
                      class_name=self._scenes.name(r["class"]), confidence=r["confidence"],
                      label=r["label"], labels=None if r["labels"] is None else tuple(
                          n for n in r["labels"].split("|") if n))
        return entry, datetime.fromtimestamp(scene.ts, timezone.utc)

    def _data_version_now(self) -> int:
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])


def _encode(e: Entry, scene: int, names: dict[str, int]) -> dict[str, Any]:
    labels = None if e.labels is None else "|" + "".join(f"{n}|" for n in sorted(e.labels))
    row: dict[str, Any] = {"scene": scene, "confidence": e.confidence, "label": e.label,
                           "class": None if e.class_name is None else names[e.class_name],
                           "labels": labels}
    for cols, values in ((_WINDOW, e.window), (_BOUNDS_WGS84, e.bounds_wgs84)):
        row.update(zip(cols, values or (None,) * 4, strict=True))
    return row


def as_box(values: Sequence[Any]) -> Box | None:
    """Four numbers as a ``Box``; ``None`` if any is missing."""
    if any(v is None for v in values):
        return None
    a, b, c, d = (float(v) for v in values)
    return (a, b, c, d)


def _chunks(ids: list[int]) -> Iterator[list[int]]:
    for start in range(0, len(ids), SQL_CHUNK):
        yield ids[start:start + SQL_CHUNK]


def _epoch(ts: datetime) -> float:
    return (ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)).timestamp()
