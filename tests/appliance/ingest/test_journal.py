"""The SQLite journal: state machine, attempts, the outbox written with the final state."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from appliance.comms.message import Message
from appliance.ingest.journal import Journal, JournalCorrupt


@pytest.fixture()
def journal(tmp_path: Path) -> Journal:
    return Journal(tmp_path / "journal.sqlite")


def test_wal_mode(journal: Journal) -> None:
    with sqlite3.connect(journal.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_claim_start_finish_writes_result_and_message_together(journal: Journal) -> None:
    scene = journal.claim("abc", "a.tif", Path("/w/x__a.tif"))
    assert (scene.state, scene.attempts) == ("claimed", 0)
    assert journal.start("abc") == 1
    assert journal.get("abc").state == "processing"  # type: ignore[union-attr]
    journal.finish("abc", Message("m1", "t/result", '{"r": 1}'))
    done = journal.get("abc")
    assert done is not None and done.state == "done" and done.result == '{"r": 1}'
    assert [m.msg_id for m in journal.pending()] == ["m1"]
    assert journal.counts() == {"claimed": 0, "processing": 0, "done": 1, "failed": 0}


def test_finish_is_atomic(journal: Journal) -> None:
    """If the outbox insert fails, the scene is not marked done either."""
    journal.claim("abc", "a.tif", Path("/w/a"))
    journal.start("abc")
    with sqlite3.connect(journal.path) as db:  # make the outbox insert (2nd statement) fail
        db.execute("CREATE TRIGGER boom BEFORE INSERT ON outbox "
                   "BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    with pytest.raises(sqlite3.IntegrityError, match="disk full"):
        journal.finish("abc", Message("m1", "t", "{}"))
    assert journal.get("abc").state == "processing"  # type: ignore[union-attr]
    assert journal.outbox_depth() == 0


def test_done_scene_stays_done_on_reclaim(journal: Journal) -> None:
    journal.claim("abc", "a.tif", Path("/w/a"))
    journal.start("abc")
    journal.finish("abc", Message("m1", "t", "{}"))
    again = journal.claim("abc", "copy.tif", Path("/w/b"))
    assert again.state == "done" and again.attempts == 1 and again.source == "a.tif"


def test_failed_scene_is_claimed_afresh(journal: Journal) -> None:
    journal.claim("abc", "a.tif", Path("/w/a"))
    journal.start("abc")
    journal.fail("abc", "unreadable", "bad header", Message("f1", "t/failed", "{}"))
    assert journal.get("abc").reason == "unreadable"  # type: ignore[union-attr]
    again = journal.claim("abc", "a.tif", Path("/w/b"))
    assert (again.state, again.attempts, again.reason) == ("claimed", 0, None)


def test_attempts_survive_reopen(tmp_path: Path) -> None:
    """A crash between start() and finish() leaves 'processing' with the attempt counted."""
    j = Journal(tmp_path / "j.sqlite")
    j.claim("abc", "a.tif", Path("/w/a"))
    j.start("abc")
    j.start("abc")
    j.close()
    reopened = Journal(tmp_path / "j.sqlite")
    scene = reopened.get("abc")
    assert scene is not None and (scene.state, scene.attempts) == ("processing", 2)
    assert [s.scene_id for s in reopened.scenes("processing")] == ["abc"]


def test_outbox_order_exclude_and_acknowledge(journal: Journal) -> None:
    for i in range(4):
        journal.enqueue(Message(f"m{i}", "t", str(i)))
    assert [m.msg_id for m in journal.pending(limit=2)] == ["m0", "m1"]
    assert [m.msg_id for m in journal.pending(exclude={"m0", "m2"})] == ["m1", "m3"]
    journal.acknowledge("m1")
    assert journal.outbox_depth() == 3
    assert [m.msg_id for m in journal.pending()] == ["m0", "m2", "m3"]
    journal.acknowledge("m0", "m3", "unknown")
    journal.acknowledge()
    assert [m.msg_id for m in journal.pending()] == ["m2"]


def test_start_unknown_scene_raises(journal: Journal) -> None:
    with pytest.raises(KeyError):
        journal.start("nope")


@pytest.mark.parametrize("damage", ["header", "truncated"])
def test_a_damaged_journal_is_refused_and_kept(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "journal.sqlite"
    j = Journal(path)
    for i in range(200):
        j.enqueue(Message(f"m{i}", "t", "x" * 500))
    j.close()
    data = path.read_bytes()
    if damage == "header":
        path.write_bytes(b"garbage garbage!" + data[16:])
    else:
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(JournalCorrupt, match=r"move .* aside"):
        Journal(path)
    assert path.exists()  # never deleted: it may hold unsent results


def test_a_work_path_that_is_not_utf8_is_stored_losslessly(journal: Journal) -> None:
    import os
    work = Path(os.fsdecode(b"/box/work/abc/caf\xe9.tif"))
    journal.claim("s1", "caf\\xe9.tif", work)
    scene = journal.get("s1")
    assert scene is not None and scene.work_path == work


def test_a_job_is_committed_once_with_its_event_and_ended_atomically(journal: Journal) -> None:
    first = journal.add_job("j1", '{"job": 1}', Message("acc-1", "r/jobs", "accepted"))
    again = journal.add_job("j1", '{"job": "other"}', Message("acc-1b", "r/jobs", "accepted"))
    assert first == again and first.state == "open" and first.job == '{"job": 1}'
    assert [m.msg_id for m in journal.pending()] == ["acc-1"]  # one accepted event
    journal.job_scene("j1", "scene-a")
    assert journal.job_waits_on("scene-a") and journal.open_job_count() == 1
    journal.end_job("j1", "done", Message("done-1", "r/jobs", "done"))
    ended = journal.job("j1")
    assert ended is not None and ended.state == "done" and ended.final is not None
    assert ended.final.msg_id == "done-1" and not journal.job_waits_on("scene-a")
    assert [m.msg_id for m in journal.pending()] == ["acc-1", "done-1"]
    assert journal.open_jobs() == [] and journal.open_job_count() == 0


def test_ended_jobs_are_forgotten_after_their_age_and_open_ones_never(
        journal: Journal) -> None:
    journal.add_job("old", "{}", Message("a-old", "t", "x"))
    journal.end_job("old", "failed", Message("f-old", "t", "x"))
    journal.add_job("open", "{}", Message("a-open", "t", "x"))
    assert journal.forget_jobs(ended_before=0.0) == 0
    assert journal.forget_jobs(ended_before=time.time() + 1) == 1
    assert journal.job("old") is None and journal.job("open") is not None
