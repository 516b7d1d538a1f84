"""The SQLite journal: the scene state machine and the MQTT outbox, in one WAL database.

A scene moves ``claimed → processing → done | failed``. ``start`` counts an attempt and
commits *before* the work begins, so a scene that kills the daemon is visible on restart
as ``processing`` with its attempt count; after ``input.max_attempts`` such crashes the
daemon fails it as ``crash-loop`` instead of trying again.

The outbox holds every QoS 1 message that must reach the broker. ``finish`` and ``fail``
write the scene's final state *and* its message in one transaction, so either both exist
or neither does; the publisher deletes a row only after the broker acknowledged it. Rows
are keyed by ``msg_id``: enqueuing the same message twice is a no-op.

One connection is shared by the main loop and the MQTT network thread (acks), guarded by
a lock; every public method is one short transaction.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.comms.message import Message
from appliance.contract.durable import open_sqlite, transaction

log = logging.getLogger(__name__)

STATES = ("claimed", "processing", "done", "failed")

_SCHEMA_TEMPLATE = """
CREATE TABLE IF NOT EXISTS scenes (
    scene_id   TEXT PRIMARY KEY,
    source     TEXT NOT NULL,
    state      TEXT NOT NULL CHECK (state IN ({states})),
    attempts   INTEGER NOT NULL DEFAULT 0,
    work_path  TEXT,
    reason     TEXT,
    message    TEXT,
    result     TEXT,
    created    REAL NOT NULL,
    updated    REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS scenes_updated ON scenes(updated);
CREATE TABLE IF NOT EXISTS claims (
    work_path  BLOB PRIMARY KEY,
    attempts   INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS outbox (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id   TEXT NOT NULL UNIQUE,
    topic    TEXT NOT NULL,
    payload  TEXT NOT NULL,
    qos      INTEGER NOT NULL DEFAULT 1,
    retain   INTEGER NOT NULL DEFAULT 0,
    created  REAL NOT NULL
);
"""
_SCHEMA = _SCHEMA_TEMPLATE.format(states=", ".join(f"'{s}'" for s in STATES))


@dataclass(frozen=True)
class SceneRecord:
    """A scene as the journal knows it: one row of the ``scenes`` table."""

    scene_id: str
    source: str
    state: str
    attempts: int
    work_path: Path | None
    reason: str | None
    message: str | None
    result: str | None


class JournalCorrupt(RuntimeError):
    """The journal database is damaged; the daemon must not start on it (nor delete it)."""


def _path_value(path: Path) -> bytes:
    """A path as SQLite stores it: its bytes (``os.fsencode``), so any file name fits."""
    return os.fsencode(path)


def _path_of(value: bytes | str | None) -> Path | None:
    if not value:
        return None
    return Path(os.fsdecode(value) if isinstance(value, bytes) else value)


class Journal:
    """SceneRecord states and the outbox in ``state/journal.sqlite`` (WAL mode)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = open_sqlite(self.path)
            check = self._db.execute("PRAGMA quick_check").fetchall()
            if check != [("ok",)]:
                raise sqlite3.DatabaseError("; ".join(str(r[0]) for r in check[:5]))
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise JournalCorrupt(
                f"the journal {self.path} is damaged ({exc}). It holds the scene states and "
                "the unsent results, so it is not removed automatically: stop the service, "
                f"move {self.path} (and its -wal/-shm files) aside to keep it for inspection "
                "or recovery (sqlite3 .recover), then start again with an empty journal"
            ) from exc

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, transaction(self._db) as db:
            yield db

    # -- scenes -----------------------------------------------------------------------

    def get(self, scene_id: str) -> SceneRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT scene_id, source, state, attempts, work_path, reason, message, result "
                "FROM scenes WHERE scene_id = ?", (scene_id,)).fetchone()
        return _scene(row) if row else None

    def scenes(self, *states: str) -> list[SceneRecord]:
        """Scenes in any of ``states`` (all when none given), oldest first."""
        query = ("SELECT scene_id, source, state, attempts, work_path, reason, message, result "
                 "FROM scenes")
        args: tuple[str, ...] = ()
        if states:
            query += f" WHERE state IN ({','.join('?' * len(states))})"
            args = states
        with self._lock:
            rows = self._db.execute(query + " ORDER BY created", args).fetchall()
        return [_scene(r) for r in rows]

    def claim(self, scene_id: str, source: str, work_path: Path) -> SceneRecord:
        """Record a claimed file; a known scene keeps its state and attempts.

        A scene that failed before is claimed afresh (state ``claimed``, attempts 0): the
        user dropped it again on purpose, perhaps after fixing the config. A ``done``
        scene stays ``done``; the caller treats the file as a duplicate.
        """
        now = time.time()
        with self._tx() as db:
            row = db.execute("SELECT state FROM scenes WHERE scene_id = ?", (scene_id,)).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO scenes (scene_id, source, state, attempts, work_path, created,"
                    " updated) VALUES (?, ?, 'claimed', 0, ?, ?, ?)",
                    (scene_id, source, _path_value(work_path), now, now))
            elif row[0] == "failed":
                db.execute(
                    "UPDATE scenes SET state = 'claimed', attempts = 0, source = ?, work_path = ?,"
                    " reason = NULL, message = NULL, updated = ? WHERE scene_id = ?",
                    (source, _path_value(work_path), now, scene_id))
            elif row[0] != "done":
                db.execute("UPDATE scenes SET work_path = ?, updated = ? WHERE scene_id = ?",
                           (_path_value(work_path), now, scene_id))
            db.execute("DELETE FROM claims WHERE work_path = ?", (_path_value(work_path),))
        scene = self.get(scene_id)
        assert scene is not None
        return scene

    def attempt(self, work_path: Path) -> int:
        """Count a read attempt of a claimed file *before* its content is read (committed
        first, like ``start``); returns the attempts so far. ``claim`` clears the count."""
        key = _path_value(work_path)
        with self._tx() as db:
            db.execute("INSERT INTO claims (work_path, attempts) VALUES (?, 1) ON CONFLICT"
                       "(work_path) DO UPDATE SET attempts = attempts + 1", (key,))
            row = db.execute("SELECT attempts FROM claims WHERE work_path = ?", (key,)).fetchone()
        return int(row[0])

    def refuse(self, scene_id: str, source: str, work_path: Path, reason: str, text: str,
               attempts: int, message: Message) -> None:
        """A claimed file failed before it became a scene (never read, or unreadable):
        a ``failed`` row of its own plus the failed message, atomically."""
        now = time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO scenes (scene_id, source, state, attempts, work_path, reason,"
                " message, created, updated) VALUES (?, ?, 'failed', ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT(scene_id) DO UPDATE SET state = 'failed', reason = excluded.reason,"
                " message = excluded.message, attempts = excluded.attempts,"
                " updated = excluded.updated",
                (scene_id, source, attempts, _path_value(work_path), reason, text, now, now))
            db.execute("DELETE FROM claims WHERE work_path = ?", (_path_value(work_path),))
            _insert(db, message)

    def start(self, scene_id: str) -> int:
        """Mark ``processing`` and count the attempt (committed first); returns attempts."""
        with self._tx() as db:
            db.execute("UPDATE scenes SET state = 'processing', attempts = attempts + 1,"
                       " updated = ? WHERE scene_id = ?", (time.time(), scene_id))
            row = db.execute("SELECT attempts FROM scenes WHERE scene_id = ?",
                             (scene_id,)).fetchone()
        if row is None:
            raise KeyError(f"scene {scene_id} is not in the journal")
        return int(row[0])

    def unstart(self, scene_id: str) -> None:
        """A stop interrupted the attempt: back to ``claimed``, the attempt not counted."""
        with self._tx() as db:
            db.execute("UPDATE scenes SET state = 'claimed', attempts = MAX(attempts - 1, 0),"
                       " updated = ? WHERE scene_id = ? AND state = 'processing'",
                       (time.time(), scene_id))

    def finish(self, scene_id: str, message: Message) -> None:
        """``done`` plus the result message, atomically; the result JSON is kept for re-announce."""
        with self._tx() as db:
            db.execute("UPDATE scenes SET state = 'done', result = ?, reason = NULL,"
                       " message = NULL, updated = ? WHERE scene_id = ?",
                       (message.payload, time.time(), scene_id))
            _insert(db, message)

    def fail(self, scene_id: str, reason: str, text: str, message: Message) -> None:
        """``failed`` with a reason plus the failed message, atomically."""
        with self._tx() as db:
            db.execute("UPDATE scenes SET state = 'failed', reason = ?, message = ?,"
                       " updated = ? WHERE scene_id = ?", (reason, text, time.time(), scene_id))
            _insert(db, message)

    def counts(self) -> dict[str, int]:
        """Scenes per state (every state present, zero when empty)."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM scenes GROUP BY state").fetchall()
        out = dict.fromkeys(STATES, 0)
        out.update({str(s): int(n) for s, n in rows})
        return out

    def recent(self, limit: int) -> list[tuple[SceneRecord, float]]:
        """The ``limit`` scenes that changed last, newest first, each with that time (epoch
        seconds): what the dashboard lists."""
        with self._lock:
            rows = self._db.execute(
                "SELECT scene_id, source, state, attempts, work_path, reason, message, result,"
                " updated FROM scenes ORDER BY updated DESC LIMIT ?", (limit,)).fetchall()
        return [(_scene(r[:8]), float(r[8])) for r in rows]

    def failure_reasons(self) -> dict[str, int]:
        """Failed scenes per reason slug (``failed/<reason>/``)."""
        with self._lock:
            rows = self._db.execute("SELECT reason, COUNT(*) FROM scenes WHERE state = 'failed'"
                                    " GROUP BY reason").fetchall()
        return {str(r or "unknown"): int(n) for r, n in rows}

    def writable(self) -> bool:
        """True when the journal can take a write now: a write transaction opens (the file,
        its folder and the disk allow it) and is rolled back at once."""
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute("ROLLBACK")
        except sqlite3.Error:
            return False
        return True

    # -- outbox -----------------------------------------------------------------------

    def enqueue(self, message: Message) -> bool:
        """Add a message unless one with its msg_id is pending; True if added."""
        with self._tx() as db:
            return _insert(db, message)

    def pending(self, limit: int = 100, exclude: set[str] | frozenset[str] = frozenset()
                ) -> list[Message]:
        """Oldest outbox rows first, skipping msg_ids in ``exclude`` (already in flight)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT msg_id, topic, payload, qos, retain FROM outbox ORDER BY seq LIMIT ?",
                (limit + len(exclude),)).fetchall()
        out = [Message(r[0], r[1], r[2], int(r[3]), bool(r[4]))
               for r in rows if r[0] not in exclude]
        return out[:limit]

    def acknowledge(self, *msg_ids: str) -> None:
        """The broker has these messages: drop their rows (one transaction, one fsync)."""
        if not msg_ids:
            return
        with self._tx() as db:
            db.executemany("DELETE FROM outbox WHERE msg_id = ?", [(m,) for m in msg_ids])

    def outbox_depth(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0])

    def unsent(self) -> list[tuple[str, float]]:
        """(topic, enqueued at, epoch s) of every outbox row not yet acknowledged."""
        with self._lock:
            rows = self._db.execute("SELECT topic, created FROM outbox ORDER BY seq").fetchall()
        return [(str(r[0]), float(r[1])) for r in rows]


def _insert(db: sqlite3.Connection, m: Message) -> bool:
    cur = db.execute(
        "INSERT OR IGNORE INTO outbox (msg_id, topic, payload, qos, retain, created)"
        " VALUES (?, ?, ?, ?, ?, ?)", (m.msg_id, m.topic, m.payload, m.qos, int(m.retain),
                                       time.time()))
    return cur.rowcount > 0


def _scene(row: tuple) -> SceneRecord:
    return SceneRecord(row[0], row[1], row[2], int(row[3]), _path_of(row[4]),
                       row[5], row[6], row[7])

