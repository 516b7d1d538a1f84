"""The local retrieval index: the entry log and the faiss index kept equal, and searched.

Two stores, one truth. The entry log (``retrieval.entry_log``: SQLite, ``state/index.sqlite``)
is durable: metadata and (float16) vector of every entry. The faiss index
(``retrieval.vector_index``) is only a checkpoint of it, ``state/index.faiss``. The
crash-safety invariants:

* Every change is committed to the log first, in one transaction, and applied to faiss
  after; a crash between the two is repaired at the next start.
* At start the checkpoint is loaded and *reconciled* with the log by id: rows it lacks are
  replayed, ids whose row is gone are dropped (ids are never reused, so set differences
  suffice); a missing or unreadable checkpoint is rebuilt from the log. A SIGKILL at any
  moment therefore loses nothing that was committed.
* Checkpoints are written atomically every ``max(checkpoint_every, 10 % of the index)``
  changes (the total write volume stays linear while replay after a crash stays bounded),
  at a change of structure and at close. A read-only index (CLI queries beside a running
  daemon) never writes one: the daemon owns the checkpoint, readers replay in memory.
* Before every operation the index checks whether another process committed to the log
  (``terratile index add`` beside the daemon) and, if so, reconciles again.

A change of size across a threshold of ``desired_kind`` (or an IVF index that outgrew its
lists or whose code size changed: ``VectorIndex.stale``) rebuilds faiss from the log in the
new structure and records its recall against exact search. The quantised kinds re-score
their shortlist exactly from the log's vectors (``VectorIndex.search`` with ``exact``), so
the faiss index holds only compact codes. Filtered queries (class, scene, time range)
resolve the allowed ids in the log first; an exact index searches them with a selector, an
approximate one searches them exactly when there are at most ``filter_exact_max`` of them
(graph search with a very selective filter misses results), with a selector otherwise.

All public methods take one lock: the daemon adds from its main loop while MQTT queries
arrive on the comms thread.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from appliance.config import RetrievalConfig
from appliance.retrieval.entry_log import Entry, EntryLog, Filters, IndexStateError, as_box
from appliance.retrieval.vector_index import (
    RECALL_K,
    RECALL_QUERIES,
    Kind,
    RecallProbe,
    VectorIndex,
    build,
    desired_kind,
    exact_search,
    train_size,
    use_threads,
)
from appliance.scene.cells import SceneCells

log = logging.getLogger(__name__)

DB_NAME = "index.sqlite"
FAISS_NAME = "index.faiss"
REPLAY_CHUNK = 65536


class IndexableScene(Protocol):
    """What ``add_scene`` reads of a ``SceneOutcome`` (appliance/scene/pipeline.py)."""

    @property
    def scene_id(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def cells(self) -> SceneCells: ...
    @property
    def label_thresholds(self) -> dict[str, float] | None: ...


@dataclass(frozen=True)
class Hit:
    """One search result: similarity (cosine) and the entry's metadata."""

    id: int
    score: float
    entry: Entry
    time: datetime

    def as_dict(self) -> dict[str, Any]:
        """The result as published in a retrieval reply."""
        e = self.entry
        return {
            "id": self.id, "score": round(self.score, 6), "scene_id": e.scene_id,
            "source": e.source, "window": list(e.window) if e.window else None,
            "crs": e.crs, "bounds": list(e.bounds) if e.bounds else None,
            "bounds_wgs84": list(e.bounds_wgs84) if e.bounds_wgs84 else None,
            "class": e.class_name, "confidence": e.confidence, "label": e.label,
            "labels": list(e.labels) if e.labels is not None else None,
            "time": self.time.isoformat(),
        }


def stored_dim(state_dir: Path) -> int | None:
    """The embedding size an existing index under ``state_dir`` holds (None: no index, or
    one that cannot be read: opening it decides what to do then). Read-only, no lock."""
    path = Path(state_dir) / DB_NAME
    if not path.is_file():
        return None
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()
        finally:
            db.close()
        return int(row[0]) if row is not None else None
    except (sqlite3.Error, ValueError, TypeError):
        return None


class TileIndex:
    """Persistent, crash-safe nearest-neighbour index of L2-normalised embeddings."""

    def __init__(self, state_dir: Path, cfg: RetrievalConfig, dim: int,
                 read_only: bool = False) -> None:
        self.cfg = cfg
        self.read_only = read_only
        self.dim = int(dim)
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.faiss_path = self.state_dir / FAISS_NAME
        self._lock = threading.RLock()
        use_threads(cfg.faiss_threads)
        self._log = self._open_log()
        self._since_checkpoint = 0
        self._faiss = self._load()

    def _open_log(self) -> EntryLog:
        """The entry log; a damaged one (it is a cache of published results) is moved aside
        with its checkpoint and the index starts empty, loudly. Read-only openers refuse."""
        path = self.state_dir / DB_NAME
        try:
            return EntryLog(path, self.dim)
        except sqlite3.DatabaseError as exc:
            if self.read_only:
                raise IndexStateError(f"the retrieval index {path} is damaged: {exc}") from exc
            stamp = time.strftime("%Y%m%dT%H%M%S")
            for part in (path, path.with_name(path.name + "-wal"),
                         path.with_name(path.name + "-shm"), self.faiss_path):
                if part.exists():
                    os.replace(part, part.with_name(f"{part.name}.corrupt-{stamp}"))
            log.error("retrieval index %s is damaged (%s): moved aside as *.corrupt-%s, "
                      "starting an empty index (it refills as scenes are processed)",
                      path, exc, stamp)
            return EntryLog(path, self.dim)

    @property
    def kind(self) -> Kind:
        """The faiss structure in use: flat, hnsw, ivfpq or ivfsq."""
        return self._faiss.kind

    # ---------------------------------------------------------------- writing

    def add_scene(self, outcome: IndexableScene, classes: Sequence[str] | None = None) -> int:
        """Index the valid cells of a processed scene, replacing its earlier entries.

        ``classes`` names the columns of ``cells.probs`` (the bundle's class names); the
        stored class is the fused argmax. A multi-label scene (``label_thresholds`` set)
        also stores each cell's label set: the labels at or above their threshold.
        Returns the number of vectors indexed.
        """
        cells = outcome.cells
        valid = np.flatnonzero(cells.valid)
        names = list(classes) if classes is not None else []
        labels, conf = cells.labels, cells.confidence
        th = outcome.label_thresholds
        present = (cells.probs >= np.asarray([th[n] for n in names])[None, :]
                   if th is not None else None)
        entries = []
        for i in valid:
            k = int(labels[i])
            col, row, w, h = (int(v) for v in cells.windows[i])
            entries.append(Entry(
                scene_id=outcome.scene_id, source=outcome.source, window=(col, row, w, h),
                crs=cells.crs, transform=cells.transform,
                bounds_wgs84=as_box(cells.bounds_wgs84[i]),
                class_name=names[k] if k < len(names) else str(k), confidence=float(conf[i]),
                labels=(tuple(n for n, on in zip(names, present[i], strict=True) if on)
                        if present is not None else None),
            ))
        return self.replace([outcome.scene_id], entries, cells.embeddings[valid])

    def replace(self, scene_ids: Sequence[str], entries: Sequence[Entry],
                vectors: np.ndarray) -> int:
        """Delete every entry of ``scene_ids``, then add ``entries`` with their vectors
        (the log first, then faiss). Returns the number of vectors added."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        if len(vectors) != len(entries):
            raise ValueError(f"{len(entries)} entries but {len(vectors)} vectors")
        if not np.isfinite(vectors).all():
            raise ValueError("vectors contain NaN or infinity")
        if self.read_only:
            raise IndexStateError("this index was opened read-only")
        with self._lock:
            self._sync()
            old, new = self._log.replace(scene_ids, entries, vectors, time.time())
            self._faiss.remove(old)
            if len(new):
                self._faiss.add(vectors, new)
            self._since_checkpoint += len(new) + len(old)
            self._maybe_transition()
            if self._since_checkpoint >= max(self.cfg.checkpoint_every, self._faiss.ntotal // 10):
                self.checkpoint()
            return len(new)

    def checkpoint(self) -> None:
        """Write the faiss index atomically and record the highest id it holds (or rebuild
        it when HNSW tombstones are overdue, which checkpoints too); never when read-only."""
        with self._lock:
            if self.read_only:
                return
            self._sync()
            if self._faiss.overdue:
                self._rebuild(self.kind, check_recall=False)
                return
            self._faiss.write(self.faiss_path)
            self._log.set_meta("checkpoint", {
                "max_id": self._faiss.max_id, "ntotal": self._faiss.ntotal, "kind": self.kind,
                "at": datetime.now(timezone.utc).isoformat()})
            self._since_checkpoint = 0

    def close(self) -> None:
        """Checkpoint what changed since the last checkpoint, then close the log."""
        with self._lock:
            if self._since_checkpoint:
                self.checkpoint()
            self._log.close()

    # ---------------------------------------------------------------- reading

    def count(self) -> int:
        with self._lock:
            return self._log.count()

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
            rows = self._log.entries({int(i) for i in ids.ravel() if i >= 0})
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
        """The stored vector of one entry; ``KeyError`` if it does not exist (any more)."""
        with self._lock:
            return self._log.vector(entry_id)

    def find_cell(self, scene_id: str, pixel: tuple[float, float] | None = None,
                  lonlat: tuple[float, float] | None = None) -> int | None:
        """Id of the entry of ``scene_id`` whose window (pixel col,row) or WGS84 bounds
        (lon,lat) contain the point, the nearest centre if several; ``None`` if none."""
        with self._lock:
            return self._log.find_cell(scene_id, pixel, lonlat)

    def has_scene(self, scene_id: str) -> bool:
        with self._lock:
            return self._log.has_scene(scene_id)

    def stats(self) -> dict[str, Any]:
        """Counts, type, dims, size on disk and the last recall check."""
        with self._lock:
            self._sync()
            summary = self._log.summary()
            sizes = {p.name: p.stat().st_size for p in self.state_dir.glob("index.*")
                     if p.is_file()}
            return {
                "entries": summary["entries"], "faiss_ntotal": self._faiss.ntotal,
                "tombstones": len(self._faiss.tombstones), "scenes": summary["scenes"],
                "reference_images": summary["reference_images"],
                "classes": summary["classes"], "type": self.kind, "dim": self.dim,
                "bytes_on_disk": sum(sizes.values()), "files": sizes,
                "checkpoint": self._log.meta("checkpoint"),
                "recall_check": self._log.meta("recall_check"),
            }

    # ---------------------------------------------------------------- keeping faiss = log

    def _load(self) -> VectorIndex:
        """Checkpoint + replay: the faiss index that matches the log exactly."""
        loaded = VectorIndex.read(self.faiss_path, self.dim, self.cfg)
        if loaded is None:
            self._faiss = VectorIndex.new("flat", self.dim, self.cfg)
            self._rebuild(desired_kind(self.cfg, self._log.count(), "flat"), check_recall=False)
            return self._faiss
        self._faiss = loaded
        replayed, dropped = self._reconcile()
        recorded = self._log.meta("checkpoint") or {}
        log.info("index: loaded %s checkpoint (recorded max id %s), replayed %d, dropped %d",
                 self.kind, recorded.get("max_id"), replayed, dropped)
        n = self._log.count()
        kind = desired_kind(self.cfg, n, self.kind)
        if kind != self.kind or self._faiss.stale(n):
            self._rebuild(kind, check_recall=True)
        elif self._since_checkpoint:
            self.checkpoint()
        return self._faiss

    def _reconcile(self) -> tuple[int, int]:
        """Make faiss hold exactly the log's ids: add rows it lacks, drop ids whose row is
        gone. Returns (added, dropped)."""
        in_faiss = self._faiss.live_ids()
        in_log = self._log.ids()
        stale = np.setdiff1d(in_faiss, in_log, assume_unique=True)
        missing = np.setdiff1d(in_log, in_faiss, assume_unique=True)
        self._faiss.remove(stale)
        for start in range(0, len(missing), REPLAY_CHUNK):
            ids = missing[start:start + REPLAY_CHUNK]
            self._faiss.add(self._log.vectors(ids), ids)
        self._since_checkpoint += len(missing) + len(stale)
        return len(missing), len(stale)

    def _sync(self) -> None:
        """Catch up with commits made by another process."""
        if self._log.changed_elsewhere():
            added, dropped = self._reconcile()
            log.info("index: another writer changed the log: +%d -%d", added, dropped)

    def _maybe_transition(self) -> None:
        n = self._log.count()
        kind = desired_kind(self.cfg, n, self.kind)
        if kind != self.kind or self._faiss.stale(n):
            log.info("index: %s -> %s at %d vectors", self.kind, kind, n)
            self._rebuild(kind, check_recall=True)

    def _rebuild(self, kind: Kind, check_recall: bool) -> None:
        """A new faiss index of ``kind`` from every vector in the log, then a checkpoint;
        its recall is measured and recorded when asked (never by a read-only index)."""
        n = self._log.count()
        train = probe = None
        if kind in ("ivfpq", "ivfsq"):
            train = self._log.vectors(self._log.sample_ids(train_size(self.cfg, n)))
        if check_recall and not self.read_only:
            probe = RecallProbe(self._log.vectors(self._log.sample_ids(RECALL_QUERIES)),
                                self._log.vectors)
        built = build(kind, self.dim, self.cfg, self._log.iter_vectors(REPLAY_CHUNK), train,
                      probe, size=n)
        self._faiss = built.index
        if built.recall is not None:
            n = built.index.ntotal
            self._log.set_meta("recall_check", {
                "type": kind, "n": n, f"recall_at_{RECALL_K}": built.recall,
                "queries": min(RECALL_QUERIES, n), "build_s": round(built.seconds, 2),
                "at": datetime.now(timezone.utc).isoformat()})
        self.checkpoint()

    def _search_ids(self, q: np.ndarray, k: int, filters: Filters) -> tuple[np.ndarray, np.ndarray]:
        """faiss search honouring tombstones and filters; [n,k] scores and ids (-1 = none)."""
        k = max(1, min(k, max(1, self._faiss.ntotal)))
        if not filters.restricts:
            return self._faiss.search(q, k, exact=self._log.vectors)
        allowed = self._log.ids(filters)
        if not len(allowed):
            return np.zeros((len(q), 0), np.float32), np.zeros((len(q), 0), np.int64)
        if self.kind != "flat" and len(allowed) <= self.cfg.filter_exact_max:
            return exact_search(q, self._log.vectors(allowed), allowed, k)
        return self._faiss.search(q, k, allowed, exact=self._log.vectors)
