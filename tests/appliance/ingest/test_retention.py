"""Retention and the low-disk guard: the sweeper removes by age and by size, oldest first,
never what is still in flight or waiting in the outbox; the guard stops claims on a small
real filesystem (tmpfs) and a daemon resumes by itself when space returns."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.comms.message import Message
from appliance.config import PathsConfig, RetentionConfig
from appliance.ingest.journal import Journal
from appliance.ingest.retention import DiskGuard, Sweeper
from tests.conftest import Broker
from tests.helpers.daemon import DaemonProc, P
from tests.helpers.mqtt_listener import Listener
from tests.helpers.scenes import write_scene
from tests.helpers.small_fs import fill_until_free, small_tmpfs

DAY = 86400.0


@pytest.fixture()
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "state" / "journal.sqlite")
    yield j
    j.close()


def result_dir(paths: PathsConfig, scene_id: str, size: int) -> Path:
    folder = paths.results / scene_id
    folder.mkdir(parents=True)
    (folder / "landuse.tif").write_bytes(b"x" * size)
    return folder


def claimed(journal: Journal, scene_id: str, done: bool, published: bool) -> None:
    journal.claim(scene_id, f"{scene_id}.tif", Path(f"/w/{scene_id}"))
    journal.start(scene_id)
    if done:
        journal.finish(scene_id, Message(f"m-{scene_id}", f"{P}/scene/{scene_id}/result", "{}"))
        if published:
            journal.acknowledge(f"m-{scene_id}")


def test_age_limit_keeps_what_is_in_flight_or_unpublished(tmp_path: Path,
                                                          journal: Journal) -> None:
    paths = PathsConfig(inbox=tmp_path / "inbox", results=tmp_path / "results",
                        failed=tmp_path / "failed", state=tmp_path / "state")
    processed = paths.processed_dir / "old.tif"  # moved there before b's message
    processed.parent.mkdir(parents=True)
    processed.write_bytes(b"p")
    time.sleep(0.05)
    for sid, done, published in (("a" * 64, True, True), ("b" * 64, True, False),
                                 ("c" * 64, False, False)):
        claimed(journal, sid, done, published)
        result_dir(paths, sid, 100)
    result_dir(paths, "d" * 64, 100)  # `terratile process` output: no journal row
    failed = paths.failed / "bands" / "bad.tif"
    failed.parent.mkdir(parents=True)
    failed.write_bytes(b"f")
    sweeper = Sweeper(paths, RetentionConfig(), journal)
    assert all(s.removed == 0 for s in sweeper.sweep())  # nothing is 7 days old yet
    report = {s.folder: s for s in sweeper.sweep(now=time.time() + 40 * DAY)}
    left = sorted(p.name[0] for p in paths.results.iterdir())
    assert left == ["b", "c"]  # b's result waits in the outbox, c is still processing
    assert report["results"].removed == 2 and report["results"].kept_unpublished == 2
    assert not processed.exists()
    assert failed.exists() and report["failed"].kept_unpublished == 1  # after b's message
    journal.acknowledge("m-" + "b" * 64)  # b is published now
    sweeper.sweep(now=time.time() + 40 * DAY)
    assert sorted(p.name[0] for p in paths.results.iterdir()) == ["c"]
    assert not failed.exists()


def test_size_limit_removes_the_oldest_first(tmp_path: Path, journal: Journal) -> None:
    paths = PathsConfig(inbox=tmp_path / "inbox", results=tmp_path / "results",
                        failed=tmp_path / "failed", state=tmp_path / "state")
    cfg = RetentionConfig.model_validate({"results": {"max_total_mb": 0.25}})
    for i in range(5):  # arriving one after another: 0 is the oldest
        sid = f"{i}" * 64
        claimed(journal, sid, True, True)
        result_dir(paths, sid, 100_000)
        time.sleep(0.02)
    report = Sweeper(paths, cfg, journal).sweep()[0]
    assert report.removed == 3 and report.freed_bytes == 300_000
    assert sorted(p.name[0] for p in paths.results.iterdir()) == ["3", "4"]  # 200 kB left


def test_the_disk_guard_on_a_real_tmpfs(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "fs", 8) as fs:
        guard = DiskGuard([fs, tmp_path], min_free_mb=4)
        assert guard.may_claim()
        ballast = fill_until_free(fs, 2)
        low = guard.check()
        assert len(low) == 1 and str(fs) in low[0]
        ballast.unlink()
        assert guard.may_claim()
        assert DiskGuard([fs], min_free_mb=0).check() == []  # 0 switches the guard off


def test_a_daemon_on_a_small_disk_stops_claiming_and_resumes_and_loses_nothing(
        tmp_path: Path, colour_bundle: Path, broker: Broker) -> None:
    """Every folder of the box on a 24 MB tmpfs; results capped to 1 kB in all (less than
    one scene's outputs: every published result goes at the next sweep)."""
    with small_tmpfs(tmp_path / "disk", 24) as disk:
        d = DaemonProc(disk / "box", colour_bundle, broker.port,
                       paths={"min_free_mb": 6}, adapt={"enabled": False},
                       retention={"sweep_seconds": 0.5, "results": {"max_total_mb": 0.001}})
        listener = Listener(broker.port, f"{P}/#")
        scenes = [write_scene(tmp_path / f"s{i}.tif", size=(128, 128), offset=float(i))
                  for i in range(3)]
        try:
            d.start()
            d.drop(scenes[0])
            listener.wait_for(lambda m: m.topic.endswith("/result"))
            ballast = fill_until_free(disk, 3)
            d.drop(scenes[1])

            def status() -> dict[str, object]:
                loaded = json.loads((d.root / "state" / "status.json").read_text())
                assert isinstance(loaded, dict)
                return loaded
            d.wait(lambda: status()["degraded"] == ["disk"], "degraded: disk")
            time.sleep(2)  # several turns of the loop: the file must stay in the inbox
            assert (d.inbox / scenes[1].name).is_file()
            assert len(listener.matching(lambda m: m.topic.endswith("/result"))) == 1
            assert b"low disk:" in d.log.read_bytes()
            broker.stop()  # the next results cannot be published: retention must keep them
            ballast.unlink()
            d.wait(lambda: not (d.inbox / scenes[1].name).exists(), "claimed again")
            d.drop(scenes[2])
            d.wait(lambda: len(d.outbox_topics()) >= 2, "two results waiting")
            d.wait(lambda: status()["degraded"] == ["mqtt"], "disk fine, broker down")
            time.sleep(1.5)  # sweeps ran: over the cap, but unpublished results stay
            waiting = [t.split("/")[-2] for t in d.outbox_topics() if t.endswith("/result")]
            assert all((d.root / "results" / sid).is_dir() for sid in waiting)
            broker.start()
            late = Listener(broker.port, f"{P}/#")
            got = late.wait_for(lambda m: m.topic.endswith("/result"), count=2, timeout=60)
            assert {m.topic.split("/")[-2] for m in got} == set(waiting)
            d.wait(lambda: not any((d.root / "results" / sid).is_dir() for sid in waiting),
                   "published results swept by the size cap")
            # The index keeps the swept scenes' cells, and a query says their outputs went.
            late.publish(f"{P}/retrieval/query", json.dumps(
                {"request_id": "q1", "vector": [1, 0, 0, 0, 0, 0], "k": 100}))
            reply = json.loads(late.wait_for(
                lambda m: m.topic == f"{P}/retrieval/response/q1")[0].payload)
            hits = reply["results"]
            assert {h["scene_id"] for h in hits} >= set(waiting)
            assert all(h["outputs_present"] is False for h in hits)
            late.close()
        finally:
            if d.proc is not None:
                d.kill()
            listener.close()



def test_ended_fleet_jobs_go_with_the_results_age(tmp_path: Path, journal: Journal) -> None:
    paths = PathsConfig(inbox=tmp_path / "inbox", results=tmp_path / "results",
                        failed=tmp_path / "failed", state=tmp_path / "state")
    journal.add_job("ended", "{}", Message("acc", "r", "{}"))
    journal.end_job("ended", "done", Message("done", "r", "{}"))
    journal.add_job("open", "{}", Message("acc-2", "r", "{}"))
    journal.acknowledge("acc", "done", "acc-2")
    sweeper = Sweeper(paths, RetentionConfig.model_validate({"results": {"max_age_days": 1}}),
                      journal, keep_processed=True)
    sweeper.sweep(now=time.time() + 0.5 * DAY)
    assert journal.job("ended") is not None  # younger than the results' age
    sweeper.sweep(now=time.time() + 2 * DAY)
    assert journal.job("ended") is None and journal.job("open") is not None
