"""The entry log's vectors: float16, one row per entry id, in the log's own SQLite database.

The vectors are the durable half of the retrieval index that is large: at 10M cells of
158-d embeddings, float32 would be 6.3 GB on disk. float16 halves that and keeps what
retrieval needs: a cosine between unit vectors changes by about 1e-3 at most, far below
the gap between neighbours that matter, so exact re-ranking and rebuilds from these
vectors give the same results as from float32 (``benchmarks/retrieval.py`` measures
recall against float32 exact search).

They live in their own table, ``vectors (id, vector)``, beside ``entries`` rather than in
it: metadata scans (filters, summaries) do not wade through vector bytes, a short list of
ids is read by primary key for re-ranking, and the table's shape is independent of the
entries' columns. The table is written in the same transaction as its entries (the caller
holds it), and a trigger deletes a vector with its entry, whatever deletes the entry.

``migrate`` converts a log of the earlier layout (a float32 ``vector`` column in
``entries``) in one transaction, so a crash leaves the old layout or the new one.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator

import numpy as np

log = logging.getLogger(__name__)

DTYPE = np.float16
SQL_CHUNK = 900  # ids per ``IN (...)``: below SQLite's default limit of 999 variables

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vectors (id INTEGER PRIMARY KEY, vector BLOB NOT NULL);
CREATE TRIGGER IF NOT EXISTS entries_drop_vector AFTER DELETE ON entries
BEGIN DELETE FROM vectors WHERE id = OLD.id; END;
"""


def create(db: sqlite3.Connection) -> None:
    """The table and its trigger, if missing (after ``entries`` exists)."""
    db.executescript(_SCHEMA)


def migrate(db: sqlite3.Connection) -> int:
    """Move float32 vectors out of an earlier ``entries.vector`` column into the table as
    float16, then drop the column, in one transaction. Returns the rows moved (0: nothing
    to migrate). The freed pages are reused by later writes."""
    columns = {r[1] for r in db.execute("PRAGMA table_info(entries)")}
    if "vector" not in columns:
        return 0
    db.create_function("to_float16", 1, _to_float16, deterministic=True)
    db.execute("BEGIN IMMEDIATE")
    try:
        moved = db.execute("INSERT INTO vectors (id, vector) "
                           "SELECT id, to_float16(vector) FROM entries").rowcount
        db.execute("ALTER TABLE entries DROP COLUMN vector")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    log.info("index: moved %d vectors into the float16 vector table", moved)
    return int(moved)


def insert(db: sqlite3.Connection, ids: list[int], vectors: np.ndarray) -> None:
    """Store [n,dim] ``vectors`` under ``ids`` (inside the caller's transaction)."""
    half = np.ascontiguousarray(vectors, DTYPE)
    db.executemany("INSERT INTO vectors (id, vector) VALUES (?, ?)",
                   zip(ids, (v.tobytes() for v in half), strict=True))


def one(db: sqlite3.Connection, entry_id: int) -> np.ndarray | None:
    """The float32 vector of one id; ``None`` if there is none."""
    row = db.execute("SELECT vector FROM vectors WHERE id = ?", (entry_id,)).fetchone()
    return None if row is None else np.frombuffer(row[0], DTYPE).astype(np.float32)


def many(db: sqlite3.Connection, ids: np.ndarray, dim: int) -> np.ndarray:
    """[len(ids), dim] float32 vectors of ``ids`` in the order given; ``KeyError`` names
    the ids that have none."""
    want = np.asarray(ids, np.int64)
    order = want.tolist()
    rows: list[tuple[int, bytes]] = []
    for start in range(0, len(order), SQL_CHUNK):
        part = order[start:start + SQL_CHUNK]
        marks = ",".join("?" * len(part))
        rows += db.execute(f"SELECT id, vector FROM vectors WHERE id IN ({marks})",
                           part).fetchall()
    got = np.fromiter((r[0] for r in rows), np.int64, len(rows))
    half = np.frombuffer(b"".join(r[1] for r in rows), DTYPE).reshape(-1, dim)
    sorter = np.argsort(got, kind="stable")
    at = sorter[np.minimum(np.searchsorted(got, want, sorter=sorter), max(0, len(got) - 1))] \
        if len(got) else np.zeros(len(want), np.int64)
    missing = want[got[at] != want] if len(got) else want
    if len(missing):
        raise KeyError(sorted(set(missing.tolist()))[:10])
    return half[at].astype(np.float32)


def iterate(db: sqlite3.Connection, dim: int,
            chunk: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, [n,dim] float32 vectors) of every row in id order, ``chunk`` rows at a time."""
    cur = db.execute("SELECT id, vector FROM vectors ORDER BY id")
    while rows := cur.fetchmany(chunk):
        ids = np.fromiter((r[0] for r in rows), np.int64, len(rows))
        half = np.frombuffer(b"".join(r[1] for r in rows), DTYPE).reshape(-1, dim)
        yield ids, half.astype(np.float32)


def _to_float16(blob: bytes) -> bytes:
    return np.frombuffer(blob, np.float32).astype(DTYPE).tobytes()
