"""The SQLite journal: the scene state machine and the MQTT outbox, in one WAL database.

A scene moves ``claimed → processing → done | failed``. ``start`` counts an attempt and
commits *before* the work begins, so a scene that kills the daemon is visible on restart
as ``processing`` with its attempt count; after ``input.max_attempts`` such crashes the
daemon fails it as ``crash-loop`` instead of trying again.

The outbox holds every QoS 1 message that must reach the broker. ``finish`` and ``fail``
write the scene's final state *and* its message in one transaction, so either both exist
or neither does; the publisher deletes a row only after the broker acknowledged it. Rows
are keyed by ``msg_id``: enqueuing the same message twice is a no-op.

Fleet jobs (``jobs``) are rows of their own: a job taken from the shared queue is written
with its ``accepted`` event in one transaction *before* the broker gets the job's
acknowledgement, and ended (``done``/``failed``) with its final event in another, so a
crash anywhere loses no job and re-sends no event under a new id. A job names its scene
by reference; the scene itself goes through the same states as an inbox file's.

One connection is shared by the main loop and the MQTT network thread (acks), guarded by
a lock; every public method is one short transaction.
"""

from __future__ import annotations

import json
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
CREATE TABLE IF NOT EXISTS jobs (
    job_id    TEXT PRIMARY KEY,
    job       TEXT NOT NULL,
    state     TEXT NOT NULL CHECK (state IN ('open', 'done', 'failed')),
    scene_id  TEXT,
    final     TEXT,
    created   REAL NOT NULL,
    updated   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_open ON jobs(state, created);
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


@dataclass(frozen=True)
class JobRecord:
    """A fleet job as the journal knows it: the job's JSON as received, its state, the
    scene it resolved to, and its final event (``done``/``failed``) once it ended."""

    job_id: str
    job: str
    state: str
    scene_id: str | None
    final: Message | None


class JournalCorrupt(RuntimeError):
    """The journal database is damaged; the daemon must not start on it (nor delete it)."""


def _path_value(path: Path) -> bytes:
    """A path as SQLite stores it: its bytes (``os.fsencode``), so any file name fits."""
    return os.fsencode(path)


def _path_or_null(path: Path | None) -> bytes | None:
    return None if path is None else _path_value(path)


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

    def claim(self, scene_id: str, source: str, work_path: Path | None) -> SceneRecord:
        """Record a claimed file (``work_path`` None: a scene read in place for a job); a
        known scene keeps its state and attempts.

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
                    (scene_id, source, _path_or_null(work_path), now, now))
            elif row[0] == "failed":
                db.execute(
                    "UPDATE scenes SET state = 'claimed', attempts = 0, source = ?, work_path = ?,"
                    " reason = NULL, message = NULL, updated = ? WHERE scene_id = ?",
                    (source, _path_or_null(work_path), now, scene_id))
            elif row[0] != "done":
                db.execute("UPDATE scenes SET work_path = ?, updated = ? WHERE scene_id = ?",
                           (_path_or_null(work_path), now, scene_id))
            if work_path is not None:
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

    # -- fleet jobs -------------------------------------------------------------------

    def add_job(self, job_id: str, job: str, accepted: Message) -> JobRecord:
        """Commit a job taken from the queue with its ``accepted`` event; a job id already
        known (the broker re-sent it, or it was submitted again) is left as it is.
        Returns the job's record."""
        now = time.time()
        with self._tx() as db:
            cur = db.execute("INSERT OR IGNORE INTO jobs (job_id, job, state, created, updated)"
                             " VALUES (?, ?, 'open', ?, ?)", (job_id, job, now, now))
            if cur.rowcount:
                _insert(db, accepted)
        record = self.job(job_id)
        assert record is not None
        return record

    def job(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT job_id, job, state, scene_id, final FROM jobs"
                                   " WHERE job_id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def open_jobs(self) -> list[JobRecord]:
        """Jobs not yet ended, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT job_id, job, state, scene_id, final FROM jobs"
                                    " WHERE state = 'open' ORDER BY created").fetchall()
        return [_job(r) for r in rows]

    def open_job_count(self) -> int:
        with self._lock:
            return int(self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = 'open'").fetchone()[0])

    def job_scene(self, job_id: str, scene_id: str) -> None:
        """The scene an open job resolved to (so reconciliation leaves it to the queue)."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET scene_id = ?, updated = ? WHERE job_id = ?",
                       (scene_id, time.time(), job_id))

    def job_waits_on(self, scene_id: str) -> bool:
        """True when an open job will run ``scene_id`` again."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM jobs WHERE scene_id = ? AND state = 'open'",
                                    (scene_id,)).fetchone() is not None

    def end_job(self, job_id: str, state: str, event: Message) -> None:
        """``done`` or ``failed`` plus the final event, atomically; the event is kept to
        answer the same job id again."""
        with self._tx() as db:
            db.execute("UPDATE jobs SET state = ?, final = ?, updated = ? WHERE job_id = ?",
                       (state, _message_text(event), time.time(), job_id))
            _insert(db, event)

    def forget_jobs(self, ended_before: float) -> int:
        """Drop jobs that ended before ``ended_before`` (epoch s); returns how many. Their
        scenes stay: a job submitted again is then run again and found done."""
        with self._tx() as db:
            return db.execute("DELETE FROM jobs WHERE state != 'open' AND updated < ?",
                              (ended_before,)).rowcount

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


def _message_text(m: Message) -> str:
    return json.dumps({"msg_id": m.msg_id, "topic": m.topic, "payload": m.payload})


def _job(row: tuple) -> JobRecord:
    final = json.loads(row[4]) if row[4] else None
    return JobRecord(row[0], row[1], row[2], row[3],
                     Message(final["msg_id"], final["topic"], final["payload"]) if final else None)


def _scene(row: tuple) -> SceneRecord:
    return SceneRecord(row[0], row[1], row[2], int(row[3]), _path_of(row[4]),
                       row[5], row[6], row[7])

