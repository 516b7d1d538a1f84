"""The drop zone: notice new files, wait until they are complete, claim them atomically.

Writers either write ``name.part`` and rename it (the clean way), or write in place; the
inbox therefore ignores ``*.part`` and dotfiles and only hands out a file whose size and
mtime have not changed for ``settle_seconds``. A file *renamed* into the inbox (from
``name.part``, or moved in from elsewhere on the same filesystem) is complete by
construction, so a rename event makes it ready at once, without the settle wait (unless a
write to it is seen afterwards). watchdog events make this fast, and a
periodic rescan catches what events miss (network mounts, events lost under load, files
present at start). A ready file is claimed by an atomic ``rename`` into its own folder
``work/<token>/<name>``: the name stays what the user dropped (outputs and messages use
it), two drops with the same name never collide, and a crash leaves the file either in
the inbox or in ``work/``.

On Linux, inotify also says when a writer *closed* a file: a file seen being written
(modified) is ready only once it was closed after its last write and then held still for
``settle_seconds`` (or, should the close event be lost, for ``WRITER_GRACE``), so an
in-place writer that pauses is not claimed half-written. Without such events (rescan only)
the size/mtime settle is the rule.

A file name that is not valid UTF-8 (e.g. Latin-1 ``caf\xe9.tif``) cannot go into the
journal or a JSON message; its claimed copy is named by ``safe_name`` (the undecodable
bytes written as ``\xe9``) and the original bytes are kept beside it in ``.source``, so the
file gets its own name back in ``processed/`` or ``failed/``. Symlinks, FIFOs and devices
are claimed like files (so the lifecycle can refuse them into ``failed/``); nothing here
opens or follows them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    FileClosedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver


def _observer() -> BaseObserver:
    """On Linux, an inotify observer that reports a file moved in from outside the inbox as
    a move (not a creation); elsewhere the platform's default."""
    try:
        from watchdog.observers.inotify import InotifyObserver
    except ImportError:  # pragma: no cover - other platforms
        return Observer()
    return InotifyObserver(generate_full_events=True)


log = logging.getLogger(__name__)

WRITER_GRACE = 600.0
"""Seconds a file seen written but never seen closed must hold still before it is taken
anyway (the close event may be lost when inotify's queue overflows)."""

SOURCE_NAME = ".source"
"""Beside a claimed file whose name was not UTF-8: the original name's bytes."""


def safe_name(name: str) -> str:
    """``name`` if it is valid UTF-8, else its bytes with the undecodable ones as ``\\xNN``."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    return name


def original_name(work_path: Path) -> str:
    """The name a claimed file had in the inbox (see ``safe_name``)."""
    try:
        return os.fsdecode((work_path.parent / SOURCE_NAME).read_bytes())
    except OSError:
        return work_path.name


def _is_dir(path: Path) -> bool:
    """A real folder (a symlink to one is not)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def ignored(name: str) -> bool:
    """Half-written (``.part``) and hidden files are never picked up."""
    return name.startswith(".") or name.endswith(".part")


@dataclass
class _Candidate:
    size: int
    mtime_ns: int
    stable_since: float
    writing: bool = False  # inotify saw a write and no close-after-write yet
    renamed: bool = False  # renamed into the inbox and not written since: ready at once


class _Events(FileSystemEventHandler):
    """Forwards created/modified/moved/closed paths to the inbox."""

    def __init__(self, inbox: Inbox) -> None:
        self.inbox = inbox

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            return
        target = getattr(event, "dest_path", "") or event.src_path
        writing: bool | None = None
        if isinstance(event, FileModifiedEvent):  # not "created": a symlink or FIFO never closes
            writing = True
        elif isinstance(event, FileClosedEvent):
            writing = False
        renamed = isinstance(event, FileMovedEvent) and bool(event.dest_path)
        self.inbox.notice(Path(os.fsdecode(target)), writing, renamed)


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
        self._may_claim: Callable[[], bool] = lambda: True
        self._observer: BaseObserver | None = None
        self._watch = watch

    def start(self) -> None:
        """Start watching (events are a speed-up; rescans are the guarantee)."""
        if self._watch and self._observer is None:
            observer = _observer()
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

    def notice(self, path: Path, writing: bool | None = None, renamed: bool = False) -> None:
        """A file may have appeared or changed (called from the watchdog thread);
        ``writing``: True on a write event, False on close-after-write, None: unknown;
        ``renamed``: it was renamed into the inbox (complete, ready without settling)."""
        if path.parent != self.dir or ignored(path.name):
            return
        with self._lock:
            cand = self._candidates.setdefault(path, _Candidate(-1, -1, time.monotonic()))
            if renamed:
                cand.renamed, cand.writing = True, False
            if writing is not None:
                cand.writing = writing
                cand.renamed = cand.renamed and not writing  # written after the rename
                if not writing:  # closed: the settle starts now
                    cand.stable_since = time.monotonic()
        self._wake.set()

    def rescan(self) -> None:
        """List the inbox and add every eligible file as a candidate."""
        self._last_scan = time.monotonic()
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return
        for entry in entries:
            try:  # symlinks, FIFOs, devices too: the lifecycle refuses them with a reason
                if entry.is_dir(follow_symlinks=False) or ignored(entry.name):
                    continue
            except OSError:
                continue
            self.notice(Path(entry.path))

    def wait(self, timeout: float) -> None:
        """Sleep until an event arrives or ``timeout`` passes."""
        self._wake.wait(timeout)
        self._wake.clear()

    def wake(self) -> None:
        """End a ``wait`` early (new work queued, stop requested)."""
        self._wake.set()

    def waiting(self) -> int:
        """Files waiting in the inbox (settled or not). A late watchdog event can name a
        file already claimed; such a candidate is dropped here, not counted."""
        with self._lock:
            for path in list(self._candidates):
                if not os.path.lexists(path):
                    del self._candidates[path]
            return len(self._candidates)

    def in_work(self) -> int:
        """Claimed files in ``work/``: the one being processed, or left by a crash."""
        try:
            folders = [f for f in self.work.iterdir() if f.is_dir()]
        except FileNotFoundError:
            return 0
        return sum(len(self._inside(f)) for f in folders)

    def depth(self) -> int:
        """The queue: scenes not finished yet, waiting in the inbox or claimed in ``work/``."""
        return self.waiting() + self.in_work()

    def ready(self) -> list[Path]:
        """Candidates renamed into the inbox, or whose size and mtime held still for
        ``settle_seconds``; oldest first."""
        now = time.monotonic()
        if now - self._last_scan >= self.rescan_every:
            self.rescan()
        out: list[tuple[int, Path]] = []
        with self._lock:
            for path, cand in list(self._candidates.items()):
                try:
                    st = os.lstat(path)  # never follows a link, never opens
                except OSError:
                    del self._candidates[path]
                    continue
                if cand.renamed and not cand.writing:
                    out.append((st.st_mtime_ns, path))
                elif (st.st_size, st.st_mtime_ns) != (cand.size, cand.mtime_ns):
                    self._candidates[path] = _Candidate(st.st_size, st.st_mtime_ns, now,
                                                        cand.writing)
                elif now - cand.stable_since >= (WRITER_GRACE if cand.writing else self.settle):
                    out.append((st.st_mtime_ns, path))
        return [p for _, p in sorted(out)]

    def next_check(self) -> float:
        """Seconds until an unsettled candidate could be ready (for the main loop's sleep)."""
        with self._lock:
            if not self._candidates:
                return max(0.0, self._last_scan + self.rescan_every - time.monotonic())
        return min(self.settle / 2 or 0.05, 0.5)

    def gate_claims(self, may_claim: Callable[[], bool]) -> None:
        """Claim only while ``may_claim()`` (the low-disk guard); a refused file waits."""
        self._may_claim = may_claim

    def claim(self, path: Path) -> Path | None:
        """Atomically move a ready file into ``work/<token>/``; None if that failed or the
        claim gate is closed (the file then stays a candidate)."""
        if not self._may_claim():
            return None
        with self._lock:
            self._candidates.pop(path, None)
        folder = self.work / uuid.uuid4().hex[:12]
        name = safe_name(path.name)
        try:
            folder.mkdir()
            if name != path.name:
                (folder / SOURCE_NAME).write_bytes(os.fsencode(path.name))
            os.rename(path, folder / name)
        except FileNotFoundError:
            self.release(folder / name)
            return None
        except OSError as exc:  # e.g. no permission: leave it, the next rescan retries
            self.release(folder / name)
            log.error("cannot claim %r: %s", str(path), exc)
            return None
        return folder / name

    def release(self, work_path: Path) -> None:
        """Remove a claimed file's folder once the file has been moved on."""
        with contextlib.suppress(OSError):
            (work_path.parent / SOURCE_NAME).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            work_path.parent.rmdir()

    @staticmethod
    def _inside(folder: Path) -> list[Path]:
        """The claimed file(s) in one ``work/`` folder: anything but a folder or a dotfile."""
        try:
            return [p for p in folder.iterdir()
                    if not ignored(p.name) and not _is_dir(p)]
        except OSError:
            return []

    def claimed(self) -> list[Path]:
        """Files already in ``work/`` (left by a crash), oldest first; empty folders go."""
        files = []
        try:
            folders = [f for f in self.work.iterdir() if _is_dir(f)]
        except OSError as exc:
            log.error("cannot list %s: %s", self.work, exc)
            return []
        for folder in folders:
            inside = self._inside(folder)
            if not inside:
                self.release(folder / "-")
            files.extend(inside)

        def mtime(p: Path) -> int:
            try:
                return os.lstat(p).st_mtime_ns
            except OSError:
                return 0

        return sorted(files, key=mtime)
