"""The main loop in-process: tasks and settled files one after another, until stopped."""

from __future__ import annotations

import threading
from pathlib import Path

from appliance.ingest.inbox import Inbox
from appliance.loop import MainLoop, Periodic
from appliance.systemd import Notifier


def test_tasks_and_files_run_on_the_loop_until_a_stop(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path / "inbox", tmp_path / "work", 0.0, 30.0, watch=False)
    loop = MainLoop(Notifier({}), inbox, max_scene_seconds=60)
    (tmp_path / "inbox" / "a.tif").write_bytes(b"a")
    inbox.rescan()
    seen: list[str] = []
    idle = threading.Event()

    def handle(work: Path) -> None:
        seen.append(f"file {work.name}")
        loop.submit(lambda: seen.append("task"))

    def on_idle() -> None:
        if "task" in seen:  # the file (it may settle only on a later round) and its task
            seen.append("idle")
            idle.set()
            loop.request_stop()

    loop.submit(lambda: seen.append("first task"))
    runner = threading.Thread(target=loop.run, kwargs={
        "handle": handle, "idle": on_idle})
    runner.start()
    runner.join(timeout=10)
    assert not runner.is_alive() and idle.is_set()
    assert seen[0] == "first task" and seen[-3:] == ["file a.tif", "task", "idle"]
    assert seen.count("file a.tif") == 1
    assert loop.stopping


def test_a_failing_task_does_not_stop_the_loop(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path / "inbox", tmp_path / "work", 0.0, 30.0, watch=False)
    loop = MainLoop(Notifier({}), inbox, max_scene_seconds=60)
    ran: list[str] = []

    def boom() -> None:
        raise RuntimeError("a bad command")

    loop.submit(boom)
    loop.submit(lambda: ran.append("next"))
    loop.run(handle=lambda _w: None, idle=loop.request_stop)
    assert ran == ["next"]


def test_no_watchdog_keeper_outside_systemd(tmp_path: Path) -> None:
    inbox = Inbox(tmp_path / "inbox", tmp_path / "work", 0.0, 30.0, watch=False)
    loop = MainLoop(Notifier({}), inbox, max_scene_seconds=60)
    assert loop.keep_watchdog(lambda: None) is None


def test_files_stuck_in_work_are_retried_every_rescan_interval(tmp_path: Path) -> None:
    """Issue 16, finding 10: an error outside the scene step does not wait for a restart."""
    inbox = Inbox(tmp_path / "inbox", tmp_path / "work", 0.0, 0.05, watch=False)
    loop = MainLoop(Notifier({}), inbox, max_scene_seconds=60)
    retried: list[int] = []

    def retry() -> None:
        retried.append(1)
        if len(retried) == 2:
            loop.request_stop()
        raise OSError("a retry that fails does not stop the loop either")

    every = inbox.rescan_every
    runner = threading.Thread(target=loop.run, kwargs={
        "handle": lambda _w: None, "idle": lambda: None,
        "periodic": [Periodic("retry", every, retry, first=every)]})
    runner.start()
    runner.join(timeout=10)
    assert not runner.is_alive() and len(retried) == 2
