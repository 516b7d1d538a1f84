"""The drop zone: notice new files, wait until they are complete, claim them atomically.

Writers either write ``name.part`` and rename it (the clean way), or write in place; the
inbox therefore ignores ``*.part`` and dotfiles and only hands out a file whose size and
mtime have not changed for ``settle_seconds``. watchdog events make this fast, and a
periodic rescan catches what events miss (network mounts, events lost under load, files
present at start). A ready file is claimed by an atomic ``rename`` into its own folder
``work/<token>/<name>``: the name stays what the user dropped (outputs and messages use
it), two drops with the same name never collide, and a crash leaves the file either in
the inbox or in ``work/``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

log = logging.getLogger(__name__)

def ignored(name: str) -> bool:
    """Half-written (``.part``) and hidden files are never picked up."""
    return name.startswith(".") or name.endswith(".part")


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    stable_since: float


class _Events(FileSystemEventHandler):
    """Forwards created/modified/moved paths to the inbox."""

    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        target = getattr(event, "dest_path", "") or event.src_path
        self.inbox.notice(Path(os.fsdecode(target)))


class Inbox:
    """Watches ``inbox`` and hands out settled files, oldest first."""

    def __init__(self, inbox: Path, work: Path, settle_seconds: float, rescan_seconds: float,
                 watch: bool = True) -> None:
        self.dir = Path(inbox)
        self.work = Path(work)
        self.settle = settle_seconds
        self.rescan_every = rescan_seconds
        self.dir.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self._candidates: dict[Path, _Candidate] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._last_scan = float("-inf")
        self._observer: BaseObserver | None = None
        self._watch = watch

    def start(self) -> None:
        """Start watching (events are a speed-up; rescans are the guarantee)."""
        if self._watch and self._observer is None:
            observer = Observer()
            observer.schedule(_Events(self), str(self.dir), recursive=False)
            observer.daemon = True
            observer.start()
            self._observer = observer
        self.rescan()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    def notice(self, path: Path) -> None:
        """A file may have appeared or changed (called from the watchdog thread)."""
        if path.parent != self.dir or ignored(path.name):
            return
        with self._lock:
            self._candidates.setdefault(path, _Candidate(-1, -1, time.monotonic()))
        self._wake.set()

    def rescan(self) -> None:
        """List the inbox and add every eligible file as a candidate."""
        self._last_scan = time.monotonic()
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.is_file() and not ignored(entry.name):  # a symlinked scene is fine
                self.notice(Path(entry.path))

    def wait(self, timeout: float) -> None:
        """Sleep until an event arrives or ``timeout`` passes."""
        self._wake.wait(timeout)
        self._wake.clear()

    def wake(self) -> None:
        """End a ``wait`` early (new work queued, stop requested)."""
        self._wake.set()

    def waiting(self) -> int:
        """Files waiting in the inbox (settled or not)."""
        with self._lock:
            return len(self._candidates)

    def in_work(self) -> int:
        """Claimed files in ``work/``: the one being processed, or left by a crash."""
        try:
            folders = [f for f in self.work.iterdir() if f.is_dir()]
        except FileNotFoundError:
            return 0
        return sum(1 for f in folders for p in f.iterdir() if p.is_file())

    def depth(self) -> int:
        """The queue: scenes not finished yet, waiting in the inbox or claimed in ``work/``."""
        return self.waiting() + self.in_work()

    def ready(self) -> list[Path]:
        """Candidates whose size and mtime held still for ``settle_seconds``, oldest first."""
        now = time.monotonic()
        if now - self._last_scan >= self.rescan_every:
            self.rescan()
        out: list[tuple[int, Path]] = []
        with self._lock:
            for path, cand in list(self._candidates.items()):
                try:
                    st = path.stat()
                except FileNotFoundError:
                    del self._candidates[path]
                    continue
                if (st.st_size, st.st_mtime_ns) != (cand.size, cand.mtime_ns):
                    self._candidates[path] = _Candidate(st.st_size, st.st_mtime_ns, now)
                elif now - cand.stable_since >= self.settle:
                    out.append((st.st_mtime_ns, path))
        return [p for _, p in sorted(out)]

    def next_check(self) -> float:
        """Seconds until an unsettled candidate could be ready (for the main loop's sleep)."""
        with self._lock:
            if not self._candidates:
                return max(0.0, self._last_scan + self.rescan_every - time.monotonic())
        return min(self.settle / 2 or 0.05, 0.5)

    def claim(self, path: Path) -> Path | None:
        """Atomically move a ready file into ``work/<token>/``; None if that failed."""
        with self._lock:
            self._candidates.pop(path, None)
        folder = self.work / uuid.uuid4().hex[:12]
        folder.mkdir()
        try:
            os.rename(path, folder / path.name)
        except FileNotFoundError:
            folder.rmdir()
            return None
        except OSError as exc:  # e.g. no permission: leave it, the next rescan retries
            folder.rmdir()
            log.error("cannot claim %s: %s", path, exc)
            return None
        return folder / path.name

    def release(self, work_path: Path) -> None:
        """Remove a claimed file's folder once the file has been moved on."""
        with contextlib.suppress(OSError):
            work_path.parent.rmdir()

    def claimed(self) -> list[Path]:
        """Files already in ``work/`` (left by a crash), oldest first; empty folders go."""
        files = []
        for folder in self.work.iterdir():
            if not folder.is_dir():
                continue
            inside = [p for p in folder.iterdir() if p.is_file()]
            if not inside:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            files.extend(inside)
        return sorted(files, key=lambda p: p.stat().st_mtime_ns)
