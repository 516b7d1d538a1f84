"""The inbox: ignores .part and dotfiles, waits for the size to settle, claims atomically."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.ingest.inbox import Inbox, ignored, original_name


@pytest.fixture()
def inbox(tmp_path: Path) -> Iterator[Inbox]:
    box = Inbox(tmp_path / "inbox", tmp_path / "work", settle_seconds=0.2, rescan_seconds=0.3)
    box.start()
    yield box
    box.stop()


def ready_within(box: Inbox, timeout: float = 5.0) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = box.ready()
        if found:
            return found
        box.wait(0.05)
    return []


def test_ignored_names() -> None:
    assert ignored("scene.tif.part") and ignored(".hidden.tif")
    assert not ignored("scene.tif") and not ignored("a.partial.tif")


def test_settled_file_is_ready_and_claimed_atomically(inbox: Inbox) -> None:
    f = inbox.dir / "a.tif"
    f.write_bytes(b"x" * 100)
    assert inbox.ready() == []  # just seen: not settled yet
    assert ready_within(inbox) == [f]
    work = inbox.claim(f)
    assert work is not None and work.parent.parent == inbox.work
    assert work.read_bytes() == b"x" * 100
    assert not f.exists() and work.name == "a.tif"
    assert inbox.claimed() == [work]
    work.unlink()
    inbox.release(work)
    assert list(inbox.work.iterdir()) == []


def test_part_and_dotfiles_are_never_ready(inbox: Inbox) -> None:
    (inbox.dir / "b.tif.part").write_bytes(b"half")
    (inbox.dir / ".c.tif").write_bytes(b"hidden")
    time.sleep(0.6)
    assert inbox.ready() == [] and inbox.depth() == 0
    (inbox.dir / "b.tif.part").rename(inbox.dir / "b.tif")
    assert ready_within(inbox) == [inbox.dir / "b.tif"]


def test_growing_file_waits_until_it_stops_changing(inbox: Inbox) -> None:
    f = inbox.dir / "growing.tif"
    with f.open("wb") as fh:
        for _ in range(8):
            fh.write(b"y" * 10)
            fh.flush()
            time.sleep(0.08)
            assert inbox.ready() == []  # the size keeps changing: never ready
    assert ready_within(inbox) == [f]


def test_rescan_finds_files_without_events(tmp_path: Path) -> None:
    box = Inbox(tmp_path / "in", tmp_path / "work", settle_seconds=0.0, rescan_seconds=0.1,
                watch=False)
    box.start()
    (box.dir / "late.tif").write_bytes(b"z")
    assert ready_within(box) == [box.dir / "late.tif"]


def test_same_name_claims_do_not_collide(inbox: Inbox) -> None:
    claimed = []
    for payload in (b"one", b"two"):
        f = inbox.dir / "same.tif"
        f.write_bytes(payload)
        assert ready_within(inbox) == [f]
        claimed.append(inbox.claim(f))
    assert len({p for p in claimed if p}) == 2
    assert {p.read_bytes() for p in claimed if p} == {b"one", b"two"}


def test_claim_of_vanished_file_returns_none(inbox: Inbox) -> None:
    assert inbox.claim(inbox.dir / "gone.tif") is None


def test_a_late_event_for_a_claimed_file_does_not_count_as_waiting(inbox: Inbox) -> None:
    f = inbox.dir / "late.tif"
    f.write_bytes(b"x" * 10)
    assert ready_within(inbox) == [f]
    work = inbox.claim(f)
    assert work is not None
    inbox.notice(f, writing=False)  # the close event of the writer, delivered after the claim
    assert inbox.waiting() == 0 and inbox.depth() == 1  # only the claimed file in work/


def test_an_in_place_writer_that_pauses_is_not_claimed_until_it_closes(inbox: Inbox) -> None:
    """Finding 12: a pause longer than settle_seconds is not the end of the file."""
    f = inbox.dir / "slow.tif"
    with f.open("wb") as fh:
        fh.write(b"first half")
        fh.flush()
        time.sleep(1.0)  # five times settle_seconds, file still open
        assert inbox.ready() == []
        fh.write(b" second half")
    assert ready_within(inbox) == [f]  # closed, then settled


def test_symlinks_and_fifos_are_noticed_not_followed(tmp_path: Path) -> None:
    box = Inbox(tmp_path / "in", tmp_path / "work", settle_seconds=0.0, rescan_seconds=0.1,
                watch=False)
    (box.dir / "link.tif").symlink_to("/proc/self/pagemap")
    os.mkfifo(box.dir / "pipe.tif")
    box.start()
    assert sorted(p.name for p in ready_within(box)) == ["link.tif", "pipe.tif"]


def test_a_name_that_is_not_utf8_is_claimed_under_a_safe_name(tmp_path: Path) -> None:
    box = Inbox(tmp_path / "in", tmp_path / "work", 0.0, 30.0, watch=False)
    raw = os.fsdecode(b"caf\xe9.tif")
    (box.dir / raw).write_bytes(b"x")
    work = box.claim(box.dir / raw)
    assert work is not None and work.name == "caf\\xe9.tif"
    assert original_name(work) == raw and box.claimed() == [work] and box.in_work() == 1
    work.unlink()
    box.release(work)
    assert list(box.work.iterdir()) == []


def test_a_file_renamed_in_is_ready_at_once_one_written_in_place_settles(tmp_path: Path) -> None:
    """A rename (from ``.part`` or from elsewhere on the filesystem) is complete by
    construction: it is ready on its event, with a minute's settle still pending for a file
    written in place, and for a renamed file written again afterwards."""
    box = Inbox(tmp_path / "inbox", tmp_path / "work", settle_seconds=60, rescan_seconds=60)
    box.start()
    try:
        # Events arrive late (watchdog holds them to pair moves): first see one through.
        probe = box.dir / "probe.tif.part"
        probe.write_bytes(b"p")
        probe.rename(box.dir / "probe.tif")
        assert ready_within(box) == [box.dir / "probe.tif"]
        assert box.claim(box.dir / "probe.tif") is not None
        (box.dir / "in_place.tif").write_bytes(b"w" * 100)
        part = box.dir / "renamed.tif.part"
        part.write_bytes(b"r" * 100)
        part.rename(box.dir / "renamed.tif")
        outside = tmp_path / "moved.tif"
        outside.write_bytes(b"m" * 100)
        outside.rename(box.dir / "moved.tif")
        rewritten = tmp_path / "rewritten.tif"
        rewritten.write_bytes(b"x" * 100)
        rewritten.rename(box.dir / "rewritten.tif")
        with (box.dir / "rewritten.tif").open("ab") as fh:
            fh.write(b"more")
        want = {box.dir / "renamed.tif", box.dir / "moved.tif"}
        deadline = time.monotonic() + 5
        while not want <= set(box.ready()) and time.monotonic() < deadline:
            box.wait(0.05)
        box.wait(1.0)  # every event of the writes above has been delivered by now
        assert set(box.ready()) == want
        assert box.waiting() == 4  # the in-place and the rewritten file still settle
        work = box.claim(box.dir / "moved.tif")
        assert work is not None and work.read_bytes() == b"m" * 100
    finally:
        box.stop()
