"""Crash-safe writes, the SQLite helper and the state lock."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from appliance.contract.durable import (
    StateLock,
    atomic_path,
    atomic_write_text,
    open_sqlite,
    transaction,
)


def test_atomic_path_keeps_the_suffix_and_leaves_the_old_file_on_error(tmp_path: Path) -> None:
    target = tmp_path / "map.tif"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.suffix == ".tif" and tmp.parent == tmp_path and tmp != target
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["map.tif"]  # no temporary left behind
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["map.tif"]


def test_sqlite_helper_is_wal_with_a_busy_timeout_and_rolls_back(tmp_path: Path) -> None:
    db = open_sqlite(tmp_path / "state" / "x.sqlite")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA busy_timeout").fetchone()[0] == 5000
    db.execute("CREATE TABLE t (v INTEGER)")
    with pytest.raises(sqlite3.IntegrityError), transaction(db):
        db.execute("INSERT INTO t VALUES (1)")
        raise sqlite3.IntegrityError("constraint")
    assert db.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    with transaction(db):
        db.execute("INSERT INTO t VALUES (2)")
    assert db.execute("SELECT v FROM t").fetchall() == [(2,)]


def test_the_state_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    daemon = StateLock(tmp_path)
    assert daemon.acquire()
    other = StateLock(tmp_path)  # e.g. the CLI, or a second daemon
    assert not other.acquire() and other.held_elsewhere()
    daemon.release()
    assert not other.held_elsewhere() and other.acquire()
    other.release()
