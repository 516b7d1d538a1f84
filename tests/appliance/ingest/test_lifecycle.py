"""The scene lifecycle in-process, with a fake scene step: real journal, real folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.comms.topics import Topics
from appliance.config import InputConfig, PathsConfig
from appliance.contract.bundle import sha256_file
from appliance.contract.payloads import result_msg_id
from appliance.ingest.inbox import Inbox
from appliance.ingest.journal import Journal
from appliance.ingest.lifecycle import Outcome, SceneLifecycle
from appliance.scene.pipeline import SceneError, SceneOutcome
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

    def process(self, work: Path, scene_id: str, out_dir: Path) -> SceneOutcome:
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
