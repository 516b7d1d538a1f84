"""Crash-safe storage steps shared by every part that keeps state on disk.

One atomic write (``atomic_path``): write beside the target under a temporary name that
keeps the suffix (GDAL and PIL choose their format by it), flush it to disk, rename it into
place and flush the directory, so after a power cut a reader finds the old file or the
new one, whole, never a torn one. One SQLite connection (``open_sqlite``): WAL, full
synchronous commits and a busy timeout, so the daemon's writes survive power loss and a
CLI reading concurrently waits instead of failing; ``transaction`` is its one
``BEGIN IMMEDIATE`` … ``COMMIT``. One lock on the state folder (``StateLock``) for the
process that owns it.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)

BUSY_TIMEOUT_MS = 5000


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a directory's entries (so a rename into it survives a power
    cut), to disk, whoever wrote them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed into place on success.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}-{threading.get_ident()}.tmp{path.suffix}")
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (``atomic_path``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_model(path: Path, model: type[Model]) -> Model:
    """The ``model`` stored as JSON in ``path``; a default one when the file is missing or
    does not validate (a state file written by an older version or never written yet)."""
    try:
        return model.model_validate_json(Path(path).read_text())
    except (FileNotFoundError, ValidationError):
        return model()


def open_sqlite(path: Path, page_size: int | None = None) -> sqlite3.Connection:
    """A connection for one owner object to share between its threads (under its own lock):
    autocommit mode (transactions are explicit), WAL, full synchronous commits, busy timeout.
    ``page_size`` applies to a database created by this call (an existing one keeps its
    own; WAL fixes it, so it is set first)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    if page_size is not None:
        db.execute(f"PRAGMA page_size={int(page_size)}")
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # a commit survives power loss
    db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")  # a concurrent reader waits
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception; the caller holds its lock."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class StateLock:
    """The running daemon's exclusive hold on its state folder (``flock`` on
    ``<state>/daemon.lock``), released by the kernel when the process dies.

    A second daemon on the same state refuses to start, and CLI commands that change the
    model store refuse while a daemon runs instead of changing what it serves under it.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / "daemon.lock"
        self._fd: int | None = None

    def acquire(self) -> bool:
        """Take the lock without waiting; False when another process holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def held_elsewhere(self) -> bool:
        """Whether another process holds the lock now."""
        if self._fd is not None:
            return False
        if not self.acquire():
            return True
        self.release()
        return False
