"""The local retrieval index: tile embeddings in faiss, their metadata and vectors in SQLite.

SQLite (``state/index.sqlite``, WAL) is the durable log: one row per indexed cell or
reference image with its metadata *and* its vector as a BLOB. The faiss file
(``state/index.faiss``) is only a checkpoint of that log, written to a temporary name and
``os.replace``d into place. At start the checkpoint is loaded and reconciled with the log:
rows whose id is missing from the checkpoint are replayed, ids in the checkpoint whose row
is gone are removed. A SIGKILL at any moment therefore loses nothing that was committed.

Ids are SQLite ``AUTOINCREMENT`` rowids (never reused) stored in a faiss ``IndexIDMap2``,
so an id means the same cell in both stores forever. Re-indexing a scene deletes its old
rows and ids in the same call that adds the new ones: a scene is replaced, never duplicated.

Index type, by size and ``retrieval.index_type``: exact ``IndexFlatIP`` (embeddings are
L2-normalised, so inner product is cosine) up to ``exact_max`` vectors, then HNSW
(``auto``/``hnsw``) or IVF-PQ (``ivfpq``). When the type changes the index is rebuilt from
the SQLite vectors and its recall@10 against exact search is measured on a sample of
stored vectors, logged and kept in the stats.

HNSW cannot ``remove_ids``. Replaced ids become *tombstones*: excluded at query time with
an ``IDSelectorNot`` and dropped for good by a rebuild once they exceed
``tombstone_rebuild`` of the index (checked at each checkpoint). Flat and IVF indexes
remove ids directly.

Filtered queries (class, scene, time range) resolve the allowed ids in SQLite first. An
exact index searches with an ``IDSelectorBatch``; an approximate one searches the allowed
vectors exactly when there are at most ``filter_exact_max`` of them (graph search with a
very selective filter misses results) and with a selector otherwise.

All public methods take one lock: the daemon adds from its main loop while MQTT queries
arrive on the paho thread.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import faiss as _faiss
import numpy as np

from appliance.config import RetrievalConfig
from appliance.contract.durable import atomic_path, open_sqlite, transaction
from appliance.scene.cells import SceneCells

log = logging.getLogger(__name__)

DB_NAME = "index.sqlite"
FAISS_NAME = "index.faiss"
RECALL_K = 10
RECALL_QUERIES = 200
# faiss 1.15 switches flat search from its per-query SIMD loop to BLAS when nq * d reaches
# this threshold. Its default (128000, tuned for many OpenMP threads) keeps batches of up
# to 1000 128-d queries on the loop; with one thread that is ~8x slower than BLAS (measured
# here: 480 queries x 100k vectors, 7.2 s → 0.9 s), while a single query (nq * d = 128)
# is faster on the loop. 800 is the one-thread crossover (faiss PR #5109).
BLAS_THRESHOLD = 800

# The type stubs shipped with faiss lag its 1.15 API (SearchParametersHNSW, IDMap fields).
faiss: Any = _faiss
faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD

Box = tuple[float, float, float, float]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    scene_id TEXT NOT NULL,
    source TEXT NOT NULL,
    col INTEGER, row INTEGER, width INTEGER, height INTEGER,
    crs TEXT,
    minx REAL, miny REAL, maxx REAL, maxy REAL,
    lon_min REAL, lat_min REAL, lon_max REAL, lat_max REAL,
    class TEXT, confidence REAL, label TEXT,
    ts REAL NOT NULL,
    vector BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_scene ON entries(scene_id);
CREATE INDEX IF NOT EXISTS entries_class ON entries(class);
CREATE INDEX IF NOT EXISTS entries_ts ON entries(ts);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
_FIELDS = ("scene_id, source, col, row, width, height, crs, minx, miny, maxx, maxy, "
           "lon_min, lat_min, lon_max, lat_max, class, confidence, label, ts")
_COLUMNS = "id, " + _FIELDS
_INSERT = f"INSERT INTO entries ({_FIELDS}, vector) VALUES ({', '.join('?' * 20)})"


class IndexStateError(RuntimeError):
    """The index on disk cannot be used as configured (e.g. another embedding size)."""


class IndexableScene(Protocol):
    """What ``add_scene`` reads of a ``SceneOutcome`` (appliance/pipeline.py)."""

    @property
    def scene_id(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def cells(self) -> SceneCells: ...


@dataclass(frozen=True)
class Entry:
    """Metadata of one indexed vector: a scene cell or a reference image."""

    scene_id: str
    source: str
    window: tuple[int, int, int, int] | None = None
    crs: str | None = None
    bounds: Box | None = None
    bounds_wgs84: Box | None = None
    class_name: str | None = None
    confidence: float | None = None
    label: str | None = None


@dataclass(frozen=True)
class Filters:
    """Restrictions on results; ``None`` fields do not filter."""

    class_name: str | None = None
    scene_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    exclude_ids: frozenset[int] = field(default_factory=frozenset)

    @property
    def restricts(self) -> bool:
        """True when the allowed ids must come from SQLite (not just an exclusion)."""
        return any(v is not None for v in (self.class_name, self.scene_id, self.since, self.until))

    def sql(self) -> tuple[str, list[Any]]:
        """A WHERE clause (without the keyword) and its parameters."""
        clauses, params = ["1"], []  # type: tuple[list[str], list[Any]]
        if self.class_name is not None:
            clauses.append("class = ?")
            params.append(self.class_name)
        if self.scene_id is not None:
            clauses.append("scene_id = ?")
            params.append(self.scene_id)
        if self.since is not None:
            clauses.append("ts >= ?")
            params.append(_epoch(self.since))
        if self.until is not None:
            clauses.append("ts <= ?")
            params.append(_epoch(self.until))
        return " AND ".join(clauses), params


@dataclass(frozen=True)
class Hit:
    """One search result: similarity (cosine) and the entry's metadata."""

    id: int
    score: float
    entry: Entry
    time: datetime

    def as_dict(self) -> dict[str, Any]:
        e = self.entry
        return {
            "id": self.id, "score": round(self.score, 6), "scene_id": e.scene_id,
            "source": e.source, "window": list(e.window) if e.window else None,
            "crs": e.crs, "bounds": list(e.bounds) if e.bounds else None,
            "bounds_wgs84": list(e.bounds_wgs84) if e.bounds_wgs84 else None,
            "class": e.class_name, "confidence": e.confidence, "label": e.label,
            "time": self.time.isoformat(),
        }


def _epoch(ts: datetime) -> float:
    return (ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)).timestamp()


def _box(values: Sequence[Any]) -> Box | None:
    if any(v is None for v in values):
        return None
    a, b, c, d = (float(v) for v in values)
    return (a, b, c, d)


class TileIndex:
    """Persistent, crash-safe nearest-neighbour index of L2-normalised embeddings."""

    def __init__(self, state_dir: Path, cfg: RetrievalConfig, dim: int,
                 read_only: bool = False) -> None:
        self.cfg = cfg
        self.read_only = read_only
        self.dim = int(dim)
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = self.state_dir / DB_NAME
        self.faiss_path = self.state_dir / FAISS_NAME
        self._lock = threading.RLock()
        if cfg.faiss_threads:
            faiss.omp_set_num_threads(cfg.faiss_threads)
        self._db = open_sqlite(self.db_path)
        self._db.executescript(_SCHEMA)
        self._check_dim()
        self._tombstones: set[int] = set()
        self._since_checkpoint = 0
        self._data_version = self._db.execute("PRAGMA data_version").fetchone()[0]
        self.kind = "flat"
        self._index = self._load()

    # ---------------------------------------------------------------- writing

    def add_scene(self, outcome: IndexableScene, classes: Sequence[str] | None = None) -> int:
        """Index the valid cells of a processed scene, replacing its earlier entries.

        ``classes`` names the columns of ``cells.probs`` (the bundle's class names); the
        stored class is the fused argmax. Returns the number of vectors indexed.
        """
        cells = outcome.cells
        valid = np.flatnonzero(cells.valid)
        names = list(classes) if classes is not None else []
        labels, conf = cells.labels, cells.confidence
        entries = []
        for i in valid:
            k = int(labels[i])
            col, row, w, h = (int(v) for v in cells.windows[i])
            entries.append(Entry(
                scene_id=outcome.scene_id, source=outcome.source, window=(col, row, w, h),
                crs=cells.crs, bounds=_box(cells.bounds[i]),
                bounds_wgs84=_box(cells.bounds_wgs84[i]),
                class_name=names[k] if k < len(names) else str(k), confidence=float(conf[i]),
            ))
        return self.replace([outcome.scene_id], entries, cells.embeddings[valid])

    def replace(self, scene_ids: Sequence[str], entries: Sequence[Entry],
                vectors: np.ndarray) -> int:
        """Delete every entry of ``scene_ids``, then add ``entries`` with their vectors.

        One SQLite transaction (the durable log) first, then the in-memory faiss index;
        a crash between the two is repaired by the reconciliation at the next start.
        """
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        if len(vectors) != len(entries):
            raise ValueError(f"{len(entries)} entries but {len(vectors)} vectors")
        if not np.isfinite(vectors).all():
            raise ValueError("vectors contain NaN or infinity")
        if self.read_only:
            raise IndexStateError("this index was opened read-only")
        now = time.time()
        with self._lock:
            self._sync()
            with transaction(self._db) as cur:
                old: list[int] = []
                for sid in dict.fromkeys(scene_ids):
                    old += [r[0] for r in cur.execute("SELECT id FROM entries WHERE scene_id = ?",
                                                      (sid,))]
                    cur.execute("DELETE FROM entries WHERE scene_id = ?", (sid,))
                new = []
                for e, v in zip(entries, vectors, strict=True):
                    cur.execute(
                        _INSERT,
                        (e.scene_id, e.source, *(e.window or (None,) * 4), e.crs,
                         *(e.bounds or (None,) * 4), *(e.bounds_wgs84 or (None,) * 4),
                         e.class_name, e.confidence, e.label, now, v.tobytes()),
                    )
                    new.append(int(cur.execute("SELECT last_insert_rowid()").fetchone()[0]))
            self._remove(np.asarray(old, np.int64))
            if len(new):
                self._index.add_with_ids(vectors, np.asarray(new, np.int64))
            self._since_checkpoint += len(new) + len(old)
            self._maybe_transition()
            # Checkpoints grow with the index; spacing them by a tenth of its size keeps the
            # total write volume linear while replay after a crash stays bounded.
            if self._since_checkpoint >= max(self.cfg.checkpoint_every, self._index.ntotal // 10):
                self.checkpoint()
            return len(new)

    def remove_scene(self, scene_id: str) -> int:
        """Delete every entry of one scene; returns how many were removed."""
        with self._lock:
            before = self.count()
            self.replace([scene_id], [], np.zeros((0, self.dim), np.float32))
            return before - self.count()

    def checkpoint(self) -> None:
        """Write the faiss index atomically and record the highest id it holds.

        A read-only index (CLI queries beside a running daemon) never writes: the daemon
        owns the checkpoint, readers replay from the log in memory.
        """
        with self._lock:
            if self.read_only:
                return
            self._sync()
            if self.kind == "hnsw" and len(self._tombstones) > self.cfg.tombstone_rebuild * max(
                    1, self._index.ntotal):
                self._rebuild(self.kind, check_recall=False)  # drops them; checkpoints itself
                return
            with atomic_path(self.faiss_path) as tmp:
                faiss.write_index(self._index, str(tmp))
            ids = self._faiss_ids()
            self._set_meta("checkpoint", {"max_id": int(ids.max()) if len(ids) else 0,
                                          "ntotal": int(self._index.ntotal), "kind": self.kind,
                                          "at": datetime.now(timezone.utc).isoformat()})
            self._since_checkpoint = 0

    def close(self) -> None:
        """Checkpoint what changed since the last checkpoint, then close the database."""
        with self._lock:
            if self._since_checkpoint:
                self.checkpoint()
            self._db.close()

    # ---------------------------------------------------------------- reading

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

    def search(self, vector: np.ndarray, k: int, filters: Filters | None = None) -> list[Hit]:
        """Top-``k`` entries by cosine similarity to one vector."""
        return self.search_batch(np.asarray(vector, np.float32).reshape(1, -1), k, filters)[0]

    def search_batch(self, vectors: np.ndarray, k: int, filters: Filters | None = None,
                     exclude: Sequence[int | None] | None = None) -> list[list[Hit]]:
        """Top-``k`` per query row; ``exclude[i]`` drops one id from query i's results."""
        q = np.ascontiguousarray(vectors, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"query vectors must be [n, {self.dim}], got {list(q.shape)}")
        if not np.isfinite(q).all():
            raise ValueError("query vector contains NaN or infinity")
        filters = filters or Filters()
        own = list(exclude) if exclude is not None else [None] * len(q)
        extra = len(filters.exclude_ids) + (1 if any(e is not None for e in own) else 0)
        with self._lock:
            self._sync()
            scores, ids = self._search_ids(q, k + extra, filters)
            rows = self._rows({int(i) for i in ids.ravel() if i >= 0})
        out = []
        for qi in range(len(q)):
            hits = []
            for s, i in zip(scores[qi], ids[qi], strict=True):
                i = int(i)
                if i < 0 or i == own[qi] or i in filters.exclude_ids or i not in rows:
                    continue
                entry, ts = rows[i]
                hits.append(Hit(i, float(s), entry, ts))
                if len(hits) == k:
                    break
            out.append(hits)
        return out

    def vector(self, entry_id: int) -> np.ndarray:
        """The stored vector of one entry (from the durable log)."""
        with self._lock:
            row = self._db.execute("SELECT vector FROM entries WHERE id = ?",
                                   (entry_id,)).fetchone()
        if row is None:
            raise KeyError(entry_id)
        return np.frombuffer(row[0], np.float32).copy()

    def entry(self, entry_id: int) -> Entry:
        """The metadata of one entry; ``KeyError`` if it does not exist (any more)."""
        with self._lock:
            return self._rows({entry_id})[entry_id][0]

    def items(self, scene_prefix: str = "") -> tuple[np.ndarray, list[Entry], np.ndarray]:
        """Ids, entries and vectors of every entry whose scene id starts with the prefix
        (e.g. ``"ref:"`` for reference images), in id order: for evaluation and export."""
        with self._lock:
            ids = np.fromiter((r[0] for r in self._db.execute(
                "SELECT id FROM entries WHERE substr(scene_id, 1, ?) = ? ORDER BY id",
                (len(scene_prefix), scene_prefix))), np.int64)
            rows = self._rows(set(ids.tolist()))
            return ids, [rows[int(i)][0] for i in ids], self._vectors(ids)

    def find_cell(self, scene_id: str, pixel: tuple[float, float] | None = None,
                  lonlat: tuple[float, float] | None = None) -> int | None:
        """Id of the entry of ``scene_id`` whose window (pixel col,row) or WGS84 bounds
        (lon,lat) contain the point, the nearest centre if several; ``None`` if none."""
        if (pixel is None) == (lonlat is None):
            raise ValueError("give exactly one of pixel or lonlat")
        if pixel is not None:
            x, y = pixel
            sql = ("SELECT id, col + width / 2.0, row + height / 2.0 FROM entries "
                   "WHERE scene_id = ? AND col <= ? AND ? < col + width "
                   "AND row <= ? AND ? < row + height")
        else:
            x, y = lonlat  # type: ignore[misc]
            sql = ("SELECT id, (lon_min + lon_max) / 2, (lat_min + lat_max) / 2 FROM entries "
                   "WHERE scene_id = ? AND lon_min <= ? AND ? <= lon_max "
                   "AND lat_min <= ? AND ? <= lat_max")
        with self._lock:
            rows = self._db.execute(sql, (scene_id, x, x, y, y)).fetchall()
        if not rows:
            return None
        return int(min(rows, key=lambda r: (r[1] - x) ** 2 + (r[2] - y) ** 2)[0])

    def has_scene(self, scene_id: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM entries WHERE scene_id = ? LIMIT 1",
                                    (scene_id,)).fetchone() is not None

    def stats(self) -> dict[str, Any]:
        """Counts, type, dims, size on disk and the last recall check."""
        with self._lock:
            self._sync()
            db = self._db
            count = self.count()
            scenes = db.execute("SELECT COUNT(DISTINCT scene_id) FROM entries "
                                "WHERE scene_id NOT LIKE 'ref:%'").fetchone()[0]
            refs = db.execute("SELECT COUNT(*) FROM entries "
                              "WHERE scene_id LIKE 'ref:%'").fetchone()[0]
            classes = dict(db.execute("SELECT COALESCE(class, '?'), COUNT(*) FROM entries "
                                      "GROUP BY class ORDER BY 2 DESC").fetchall())
            sizes = {p.name: p.stat().st_size for p in self.state_dir.glob("index.*")
                     if p.is_file()}
            return {
                "entries": count, "faiss_ntotal": int(self._index.ntotal),
                "tombstones": len(self._tombstones), "scenes": int(scenes),
                "reference_images": int(refs), "classes": classes, "type": self.kind,
                "dim": self.dim, "bytes_on_disk": sum(sizes.values()), "files": sizes,
                "checkpoint": self._get_meta("checkpoint"),
                "recall_check": self._get_meta("recall_check"),
            }

    # ---------------------------------------------------------------- internals

    def _check_dim(self) -> None:
        stored = self._get_meta("dim")
        if stored is None:
            self._set_meta("dim", self.dim)
        elif int(stored) != self.dim:
            raise IndexStateError(
                f"{self.db_path} holds {stored}-d embeddings but the model gives {self.dim}-d; "
                "move the index files aside to start a new index for this model")

    def _get_meta(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def _set_meta(self, key: str, value: Any) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                         (key, json.dumps(value)))

    def _desired_kind(self, n: int) -> str:
        if self.cfg.index_type == "flat":
            return "flat"
        approx = "ivfpq" if self.cfg.index_type == "ivfpq" else "hnsw"
        if n > self.cfg.exact_max:
            return approx
        # Hysteresis: an approximate index stays until the log shrinks to half the threshold.
        return approx if self.kind == approx and n > self.cfg.exact_max // 2 else "flat"

    def _maybe_transition(self) -> None:
        kind = self._desired_kind(self.count())
        if kind != self.kind:
            log.info("index: %s -> %s at %d vectors", self.kind, kind, self.count())
            self._rebuild(kind, check_recall=True)

    def _load(self) -> Any:
        """Checkpoint + replay: the faiss index that matches the SQLite log exactly."""
        index: Any = None
        if self.faiss_path.is_file():
            try:
                index = faiss.read_index(str(self.faiss_path))
            except RuntimeError as exc:
                log.warning("index: unreadable checkpoint %s (%s); rebuilding from %s",
                            self.faiss_path, exc, self.db_path.name)
        if index is None or index.d != self.dim:
            self.kind = "flat"
            self._index = make_index("flat", self.dim, self.cfg)
            self._rebuild(self._desired_kind(self.count()), check_recall=False)
            return self._index
        self.kind = _kind_of(index)
        self._index = index
        replayed, dropped = self._reconcile()
        recorded = self._get_meta("checkpoint") or {}
        log.info("index: loaded %s checkpoint (recorded max id %s), replayed %d, dropped %d",
                 self.kind, recorded.get("max_id"), replayed, dropped)
        kind = self._desired_kind(self.count())
        if kind != self.kind:
            self._rebuild(kind, check_recall=True)
        elif self._since_checkpoint:
            self.checkpoint()
        return self._index

    def _reconcile(self) -> tuple[int, int]:
        """Make faiss hold exactly the log's ids: add rows it lacks, drop ids whose row is
        gone (ids are never reused, so set differences suffice). Returns (added, dropped)."""
        in_faiss = self._faiss_ids()
        if self._tombstones:
            gone = np.fromiter(self._tombstones, np.int64, len(self._tombstones))
            in_faiss = np.setdiff1d(in_faiss, gone, assume_unique=True)
        in_log = np.fromiter((r[0] for r in self._db.execute("SELECT id FROM entries")), np.int64)
        stale = np.setdiff1d(in_faiss, in_log, assume_unique=True)
        missing = np.setdiff1d(in_log, in_faiss, assume_unique=True)
        self._remove(stale)
        for start in range(0, len(missing), 65536):
            ids = missing[start:start + 65536]
            self._index.add_with_ids(self._vectors(ids), ids)
        self._since_checkpoint += len(missing) + len(stale)
        return len(missing), len(stale)

    def _sync(self) -> None:
        """Catch up with commits made by another process (``terratile index add`` beside a
        running daemon): SQLite's ``data_version`` changes only on other connections' commits."""
        version = self._db.execute("PRAGMA data_version").fetchone()[0]
        if version != self._data_version:
            self._data_version = version
            added, dropped = self._reconcile()
            log.info("index: another writer changed the log: +%d -%d", added, dropped)

    def _rebuild(self, kind: str, check_recall: bool) -> None:
        """A new index of ``kind`` from every vector in the log; optionally recall-checked."""
        t0 = time.perf_counter()
        train = None
        if kind == "ivfpq":
            sample = self._db.execute("SELECT id FROM entries ORDER BY RANDOM() LIMIT ?",
                                      (max(256, 64 * self.cfg.ivf_nlist),)).fetchall()
            train = self._vectors(np.asarray([r[0] for r in sample], np.int64))
        index = make_index(kind, self.dim, self.cfg, train)
        wants = check_recall and kind != "flat" and not self.read_only
        exact = faiss.IndexFlatIP(self.dim) if wants else None
        all_ids = []
        for ids, vecs in self._iter_log():
            index.add_with_ids(vecs, ids)
            if exact is not None:
                exact.add(vecs)
            all_ids.append(ids)
        self._index, self.kind, self._tombstones = index, kind, set()
        took = time.perf_counter() - t0
        log.info("index: rebuilt as %s with %d vectors in %.1f s", kind, index.ntotal, took)
        if exact is not None and exact.ntotal:
            recall = self._recall(index, exact, np.concatenate(all_ids))
            check = {"type": kind, "n": int(index.ntotal), f"recall_at_{RECALL_K}": recall,
                     "queries": min(RECALL_QUERIES, int(exact.ntotal)), "build_s": round(took, 2),
                     "at": datetime.now(timezone.utc).isoformat()}
            log.info("index: recall@%d of %s vs exact = %.4f", RECALL_K, kind, recall)
            if not self.read_only:
                self._set_meta("recall_check", check)
        self.checkpoint()

    def _recall(self, index: Any, exact: Any, ids: np.ndarray) -> float:
        rng = np.random.default_rng(0)
        pick = rng.choice(exact.ntotal, size=min(RECALL_QUERIES, exact.ntotal), replace=False)
        queries = np.vstack([exact.reconstruct(int(i)) for i in pick])
        k = min(RECALL_K, exact.ntotal)
        _, truth = exact.search(queries, k)
        _, got = index.search(queries, k)
        hits = sum(len(set(ids[t[t >= 0]].tolist()) & set(g.tolist()))
                   for t, g in zip(truth, got, strict=True))
        return round(hits / (k * len(queries)), 4)

    def _iter_log(self, chunk: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        cur = self._db.execute("SELECT id, vector FROM entries ORDER BY id")
        while rows := cur.fetchmany(chunk):
            ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
            vecs = np.frombuffer(b"".join(r[1] for r in rows), np.float32).reshape(-1, self.dim)
            yield ids, vecs

    def _vectors(self, ids: np.ndarray) -> np.ndarray:
        """Vectors of ``ids`` from the log, in the order given."""
        out = np.empty((len(ids), self.dim), np.float32)
        pos = {int(i): n for n, i in enumerate(ids)}
        for start in range(0, len(ids), 900):
            part = [int(i) for i in ids[start:start + 900]]
            marks = ",".join("?" * len(part))
            for i, blob in self._db.execute(f"SELECT id, vector FROM entries WHERE id IN ({marks})",
                                            part):
                out[pos[i]] = np.frombuffer(blob, np.float32)
        return out

    def _faiss_ids(self) -> np.ndarray:
        return faiss.vector_to_array(self._index.id_map).astype(np.int64)

    def _remove(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        if self.kind == "hnsw":
            self._tombstones.update(int(i) for i in ids)
        else:
            self._index.remove_ids(np.ascontiguousarray(ids, np.int64))

    def _search_ids(self, q: np.ndarray, k: int, filters: Filters) -> tuple[np.ndarray, np.ndarray]:
        """faiss search honouring tombstones and filters; [n,k] scores and ids (-1 = none)."""
        k = max(1, min(k, max(1, self._index.ntotal)))
        if filters.restricts:
            where, args = filters.sql()
            allowed = np.fromiter((r[0] for r in self._db.execute(
                f"SELECT id FROM entries WHERE {where}", args)), np.int64)
            if not len(allowed):
                return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
            if self.kind != "flat" and len(allowed) <= self.cfg.filter_exact_max:
                return _exact(q, self._vectors(allowed), allowed, k)
            sel: Any = faiss.IDSelectorBatch(allowed)
        elif self._tombstones:
            gone = faiss.IDSelectorBatch(np.fromiter(self._tombstones, np.int64))
            sel = faiss.IDSelectorNot(gone)  # ``gone`` stays referenced until the search ends
        else:
            sel = None
        if self.kind == "hnsw":
            params: Any = faiss.SearchParametersHNSW(
                efSearch=max(self.cfg.hnsw_ef_search, k), sel=sel)
        elif self.kind == "ivfpq":
            params = faiss.SearchParametersIVF(nprobe=self.cfg.ivf_nprobe, sel=sel)
        else:
            params = faiss.SearchParameters(sel=sel)
        scores, ids = self._index.search(q, k, params=params)
        return scores, ids

    def _rows(self, ids: set[int]) -> dict[int, tuple[Entry, datetime]]:
        out: dict[int, tuple[Entry, datetime]] = {}
        ordered = sorted(ids)
        for start in range(0, len(ordered), 900):
            part = ordered[start:start + 900]
            marks = ",".join("?" * len(part))
            sql = f"SELECT {_COLUMNS} FROM entries WHERE id IN ({marks})"
            for r in self._db.execute(sql, part):
                window = None if r[3] is None else (int(r[3]), int(r[4]), int(r[5]), int(r[6]))
                out[int(r[0])] = (
                    Entry(scene_id=r[1], source=r[2], window=window, crs=r[7],
                          bounds=_box(r[8:12]), bounds_wgs84=_box(r[12:16]), class_name=r[16],
                          confidence=r[17], label=r[18]),
                    datetime.fromtimestamp(r[19], timezone.utc),
                )
        return out


def make_index(kind: str, dim: int, cfg: RetrievalConfig, train: np.ndarray | None = None) -> Any:
    """An empty ``IndexIDMap2`` of ``kind`` (flat | hnsw | ivfpq), inner-product metric.

    IVF-PQ is trained on ``train``: ``nlist`` is capped at len(train)/39 (faiss' minimum
    points per centroid) and the PQ sub-quantiser count is the largest divisor of ``dim``
    not above ``pq_m``.
    """
    if kind == "flat":
        base: Any = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        base = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = cfg.hnsw_ef_construction
        base.hnsw.efSearch = cfg.hnsw_ef_search
    else:
        if train is None or len(train) == 0:
            raise ValueError("an IVF-PQ index needs training vectors")
        nlist = max(1, min(cfg.ivf_nlist, len(train) // 39))
        m = max(d for d in range(1, min(cfg.pq_m, dim) + 1) if dim % d == 0)
        quantizer = faiss.IndexFlatIP(dim)
        base = faiss.IndexIVFPQ(quantizer, dim, nlist, m, 8, faiss.METRIC_INNER_PRODUCT)
        base.own_fields = True
        quantizer.this.disown()
        base.train(train)
        base.nprobe = cfg.ivf_nprobe
    return faiss.IndexIDMap2(base)


def _exact(q: np.ndarray, vecs: np.ndarray, ids: np.ndarray,
           k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-``k`` inner products of ``q`` against ``vecs`` (labelled ``ids``)."""
    sims = q @ vecs.T
    k = min(k, len(ids))
    top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    part = np.take_along_axis(sims, top, axis=1)
    order = np.argsort(-part, axis=1)
    return np.take_along_axis(part, order, axis=1), ids[np.take_along_axis(top, order, axis=1)]


def _kind_of(index: Any) -> str:
    inner = faiss.downcast_index(faiss.downcast_index(index).index)
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(inner, faiss.IndexIVFPQ):
        return "ivfpq"
    return "flat"
