"""The scene lifecycle in-process, with a fake scene step: real journal, real folders."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from appliance.comms.topics import Topics
from appliance.config import InputConfig, PathsConfig
from appliance.contract.bundle import sha256_file
from appliance.contract.payloads import result_msg_id
from appliance.ingest.inbox import Inbox
from appliance.ingest.journal import Journal
from appliance.ingest.lifecycle import Outcome, SceneLifecycle
from appliance.scene.pipeline import SceneError, SceneInterrupted, SceneOutcome
from appliance.scene.source import SceneSource
from tests.helpers.outcomes import outcome

TOPICS = Topics("terratile", "edge-t")


class Counts:
    """A scene observer that counts what it hears."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.ended: list[Outcome] = []

    def scene_started(self, scene_id: str) -> None:
        self.started.append(scene_id)

    def scene_ended(self, outcome: Outcome, timings: dict[str, float] | None = None) -> None:
        self.ended.append(outcome)


class Box:
    """A lifecycle over a temporary box; ``process`` is what the scene step does."""

    def __init__(self, root: Path, max_attempts: int = 3) -> None:
        self.paths = PathsConfig(inbox=root / "inbox", results=root / "results",
                                 failed=root / "failed", state=root / "state")
        self.journal = Journal(root / "state" / "journal.sqlite")
        self.inbox = Inbox(self.paths.inbox, self.paths.work_dir, 0.0, 30.0, watch=False)
        self.observer = Counts()
        self.calls: list[str] = []
        self.raise_: Exception | None = None
        self.life = SceneLifecycle(self.journal, self.inbox, self.paths,
                                   InputConfig(max_attempts=max_attempts), TOPICS, "edge-t",
                                   process=self.process, after=lambda _o: None,
                                   observer=self.observer)

    def process(self, source: SceneSource, scene_id: str, out_dir: Path) -> SceneOutcome:
        self.calls.append(scene_id)
        if self.raise_ is not None:
            raise self.raise_
        return outcome(scene_id, seed=1)

    def claim(self, name: str, data: bytes) -> Path:
        path = self.paths.inbox / name
        path.write_bytes(data)
        work = self.inbox.claim(path)
        assert work is not None
        return work

    def outbox(self) -> dict[str, str]:
        """topic → payload of the pending outbox rows."""
        return {m.topic: m.payload for m in self.journal.pending()}


@pytest.fixture()
def box(tmp_path: Path) -> Box:
    return Box(tmp_path)


def test_a_done_scene_has_its_result_row_and_its_input_in_processed(box: Box) -> None:
    work = box.claim("a.tif", b"scene a")
    scene_id = sha256_file(work)
    assert box.life.handle(work) == "done"
    row = json.loads(box.outbox()[TOPICS.scene(scene_id, "result")])
    assert row["msg_id"] == result_msg_id(scene_id) and row["scene_id"] == scene_id
    assert box.journal.get(scene_id).state == "done"  # type: ignore[union-attr]
    assert (box.paths.processed_dir / "a.tif").read_bytes() == b"scene a"
    assert not work.exists() and not work.parent.exists()
    assert box.observer.started == [scene_id] and box.observer.ended == ["done"]


def test_a_redropped_scene_is_not_recomputed_and_reannounced_with_the_same_msg_id(
        box: Box) -> None:
    first = box.claim("a.tif", b"scene a")
    scene_id = sha256_file(first)
    box.life.handle(first)
    box.journal.acknowledge(result_msg_id(scene_id))  # the broker took the first result
    assert box.outbox() == {}
    again = box.claim("a-again.tif", b"scene a")
    assert box.life.handle(again) == "duplicate"
    assert box.calls == [scene_id]
    row = json.loads(box.outbox()[TOPICS.scene(scene_id, "result")])
    assert row["msg_id"] == result_msg_id(scene_id)
    assert box.observer.ended == ["done", "duplicate"]


def test_a_refused_scene_moves_to_failed_with_a_sidecar_and_a_failed_message(box: Box) -> None:
    box.raise_ = SceneError("bands", "2 bands, the model needs 3")
    work = box.claim("two.tif", b"two bands")
    scene_id = sha256_file(work)
    assert box.life.handle(work) == "failed"
    kept = box.paths.failed / "bands" / "two.tif"
    sidecar = json.loads(kept.with_name("two.tif.json").read_text())
    assert kept.read_bytes() == b"two bands"
    assert sidecar["reason"] == "bands" and sidecar["moved_to"] == str(kept)
    message = json.loads(box.outbox()[TOPICS.scene(scene_id, "failed")])
    assert message["msg_id"] == sidecar["msg_id"] and message["attempts"] == 1
    assert box.journal.get(scene_id).reason == "bands"  # type: ignore[union-attr]


def test_an_unexpected_error_costs_the_scene_not_the_box(box: Box) -> None:
    box.raise_ = MemoryError("out of memory")
    work = box.claim("big.tif", b"big")
    assert box.life.handle(work) == "failed"
    assert (box.paths.failed / "error" / "big.tif").is_file()
    box.raise_ = None
    assert box.life.handle(box.claim("next.tif", b"next")) == "done"


def test_the_file_is_in_failed_before_the_journal_says_so(box: Box) -> None:
    """A crash between the two steps leaves the file where the message will say."""
    def crash(*_args: object) -> None:
        raise KeyboardInterrupt  # the process dies here

    box.raise_ = SceneError("nodata", "all nodata")
    box.journal.fail = crash  # type: ignore[method-assign]
    work = box.claim("empty.tif", b"empty")
    scene_id = sha256_file(work)
    with pytest.raises(KeyboardInterrupt):
        box.life.handle(work)
    assert (box.paths.failed / "nodata" / "empty.tif").is_file()
    assert (box.paths.failed / "nodata" / "empty.tif.json").is_file()
    assert box.journal.get(scene_id).state == "processing"  # type: ignore[union-attr]


def test_reconcile_fails_crash_loops_and_vanished_files_and_redoes_work(tmp_path: Path) -> None:
    box = Box(tmp_path, max_attempts=2)
    looping = box.claim("loop.tif", b"kills the daemon")
    loop_id = sha256_file(looping)
    box.journal.claim(loop_id, "loop.tif", looping)
    box.journal.start(loop_id)
    box.journal.start(loop_id)  # two crashes while processing
    gone = box.claim("gone.tif", b"vanishes")
    gone_id = sha256_file(gone)
    box.journal.claim(gone_id, "gone.tif", gone)
    gone.unlink()
    left = box.claim("left.tif", b"left in work by a crash")
    left_id = sha256_file(left)

    box.life.reconcile()
    assert box.journal.get(loop_id).reason == "crash-loop"  # type: ignore[union-attr]
    assert (box.paths.failed / "crash-loop" / "loop.tif").is_file()
    assert box.journal.get(gone_id).reason == "missing"  # type: ignore[union-attr]
    assert box.journal.get(left_id).state == "done"  # type: ignore[union-attr]
    assert box.calls == [left_id]  # the crash-looping scene is not tried again
    assert sorted(box.observer.ended) == ["done", "failed", "failed"]


def test_reconcile_stops_taking_work_when_asked(box: Box) -> None:
    box.claim("a.tif", b"a")
    box.claim("b.tif", b"b")
    box.life.reconcile(stopping=lambda: True)
    assert box.calls == [] and box.inbox.in_work() == 2


# -- issue 16: hostile files ----------------------------------------------------------------


def _failed_rows(box: Box) -> list[dict]:
    return [json.loads(m.payload) for m in box.journal.pending() if m.topic.endswith("/failed")]


def test_a_latin1_name_is_processed_and_keeps_its_name(box: Box) -> None:
    raw = os.fsdecode(b"caf\xe9.tif")  # not UTF-8: a surrogate in the str
    work = box.claim(raw, b"scene latin")
    assert work.name == "caf\\xe9.tif"  # the claimed copy's name fits the journal and JSON
    assert box.life.handle(work) == "done"
    scene = box.journal.get(box.calls[0])
    assert scene is not None and scene.source == "caf\\xe9.tif"
    assert json.loads(box.outbox()[TOPICS.scene(scene.scene_id, "result")])
    assert (box.paths.processed_dir / raw).read_bytes() == b"scene latin"
    assert not any(box.paths.work_dir.iterdir())


def test_reconcile_survives_bad_files_left_in_work(box: Box) -> None:
    box.claim(os.fsdecode(b"caf\xe9.tif"), b"latin")
    fifo = box.paths.inbox / "pipe.tif"
    os.mkfifo(fifo)
    assert box.inbox.claim(fifo) is not None
    box.claim("good.tif", b"good")
    box.life.reconcile()  # neither the name nor the FIFO stops the start
    assert len(box.calls) == 2
    assert (box.paths.failed / "not-a-file" / "pipe.tif").exists()
    assert not any(box.paths.work_dir.iterdir())


def test_a_symlink_is_refused_unread(box: Box, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"not yours")
    link = box.paths.inbox / "pagemap.tif"
    link.symlink_to(secret)
    box.inbox.rescan()
    assert box.inbox.waiting() == 1  # noticed (not followed), so it can be refused
    work = box.inbox.claim(link)
    assert work is not None
    assert box.life.handle(work) == "failed"
    assert box.calls == []
    moved = box.paths.failed / "not-a-file" / "pagemap.tif"
    assert moved.is_symlink()
    [row] = _failed_rows(box)
    assert row["reason"] == "not-a-file" and row["source"] == "pagemap.tif"
    assert box.journal.counts()["failed"] == 1


def test_a_file_above_max_file_bytes_is_refused_unread(tmp_path: Path) -> None:
    box = Box(tmp_path)
    box.life.cfg = InputConfig(max_file_bytes=10)
    work = box.claim("big.tif", b"x" * 11)
    assert box.life.handle(work) == "failed"
    assert box.calls == []
    assert (box.paths.failed / "too-large" / "big.tif").exists()
    assert _failed_rows(box)[0]["reason"] == "too-large"


def test_the_read_attempt_is_counted_before_the_content_is_read(tmp_path: Path) -> None:
    box = Box(tmp_path, max_attempts=2)
    work = box.claim("hangs.tif", b"content")
    for _ in range(2):  # two starts that died while hashing (before the journal claim)
        box.journal.attempt(work)
    assert box.life.handle(work) == "failed"
    assert box.calls == []
    assert (box.paths.failed / "crash-loop" / "hangs.tif").exists()


def test_a_newline_in_a_name_cannot_forge_a_log_line(box: Box,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    work = box.claim("a.tif\nERROR forged", b"nl")
    with caplog.at_level(logging.INFO):
        assert box.life.handle(work) == "done"
    assert all("\n" not in r.getMessage() for r in caplog.records)


def test_a_file_stuck_in_work_by_an_error_is_retried_without_a_restart(box: Box) -> None:
    work = box.claim("a.tif", b"stuck")
    real_finish = box.journal.finish

    def broken(*_args: object) -> None:
        raise OSError("disk full")

    box.journal.finish = broken  # type: ignore[method-assign]
    box.life.handle_guarded(work)
    assert work.exists()  # stranded by an error outside the scene step
    box.journal.finish = real_finish  # type: ignore[method-assign]
    box.life.retry_stuck()
    assert not work.exists() and box.journal.counts()["done"] == 1


def test_errors_outside_the_scene_step_end_as_crash_loop(tmp_path: Path) -> None:
    box = Box(tmp_path, max_attempts=2)
    work = box.claim("a.tif", b"always")

    def broken(*_args: object) -> None:
        raise OSError("disk full")

    box.journal.finish = broken  # type: ignore[method-assign]
    for _ in range(3):
        box.life.retry_stuck()
    assert not work.exists()
    assert (box.paths.failed / "crash-loop" / "a.tif").exists()


def test_a_stop_mid_scene_keeps_it_in_work_uncounted(box: Box) -> None:
    work = box.claim("big.tif", b"big")
    box.raise_ = SceneInterrupted("x")
    assert box.life.handle(work) == "interrupted"
    assert work.exists() and box.observer.ended == []
    scene = box.journal.get(box.calls[0])
    assert scene is not None and (scene.state, scene.attempts) == ("claimed", 0)
    box.raise_ = None
    box.life.reconcile()  # the next start
    assert box.journal.counts()["done"] == 1 and not work.exists()
