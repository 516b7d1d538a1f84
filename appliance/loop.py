"""The daemon's main loop: scenes, queued tasks and periodic work, one after another, until
SIGTERM.

Everything that changes the node's state runs here, between scenes: MQTT command
handlers and finished adaptation jobs only ``submit`` a task, and periodic work (stats,
retrying files left in ``work/``, the retention sweep) is a ``Periodic`` the loop runs
when it is due. The loop feeds the systemd
watchdog, and a keeper thread feeds it during one long scene for up to
``input.max_scene_seconds``: a scene that runs longer is taken as hung, the pings stop,
systemd restarts the service, and the journal's attempt count turns a repeat into
``crash-loop``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from appliance.ingest.inbox import Inbox
from appliance.systemd import Notifier

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Periodic:
    """``task`` every ``every`` seconds, the first time ``first`` seconds after the start."""

    name: str
    every: float
    task: Callable[[], object]
    first: float = 0.0


class MainLoop:
    """Runs the node's work on one thread; see the module docstring."""

    def __init__(self, notifier: Notifier, inbox: Inbox, max_scene_seconds: float) -> None:
        self.notifier = notifier
        self.inbox = inbox
        self.max_scene_seconds = max_scene_seconds
        self._stop = threading.Event()
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def submit(self, task: Callable[[], None]) -> None:
        """Run ``task`` on the loop between scenes (thread-safe)."""
        self._tasks.put(task)
        self.inbox.wake()

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        """Finish the current scene, then stop (SIGTERM, SIGINT)."""
        log.info("stop requested%s", f" (signal {signum})" if signum else "")
        self._stop.set()
        self.inbox.wake()

    def run(self, handle: Callable[[Path], None], idle: Callable[[], None],
            periodic: Sequence[Periodic] = ()) -> None:
        """Until stopped: tasks, then each settled inbox file claimed and ``handle``d, then
        the ``periodic`` work that is due, ``idle`` (the node is ready again), then sleep
        until the inbox or a task wakes the loop."""
        start = time.monotonic()
        due = [start + p.first for p in periodic]
        while not self._stop.is_set():
            self.notifier.watchdog()
            self._run_tasks()
            for path in self.inbox.ready():
                if self._stop.is_set():
                    break
                self.notifier.watchdog()
                work = self.inbox.claim(path)
                if work is not None:
                    handle(work)
                self._run_tasks()
            for i, p in enumerate(periodic):
                if time.monotonic() >= due[i] and not self._stop.is_set():
                    try:
                        p.task()
                    except Exception:
                        log.exception("%s failed", p.name)
                    due[i] = time.monotonic() + p.every
            idle()
            self.inbox.wait(min(self.inbox.next_check(), self._tick()))

    def keep_watchdog(self, busy_since: Callable[[], float | None]) -> threading.Event | None:
        """Start the keeper thread (when systemd asked for a watchdog); set the returned
        event to end it. ``busy_since`` says since when the current scene runs."""
        interval = self.notifier.watchdog_interval
        if interval is None:
            return None
        done = threading.Event()

        def keep() -> None:
            while not done.wait(interval / 2):
                since = busy_since()
                if since is not None and time.monotonic() - since < self.max_scene_seconds:
                    self.notifier.watchdog()

        threading.Thread(target=keep, name="watchdog", daemon=True).start()
        return done

    def _tick(self) -> float:
        """Longest sleep of the loop: short enough for the watchdog."""
        interval = self.notifier.watchdog_interval
        return min(1.0, interval) if interval else 1.0

    def _run_tasks(self) -> None:
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                return
            try:
                task()
            except Exception:
                log.exception("task %s failed", getattr(task, "__name__", task))
