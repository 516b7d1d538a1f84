"""Disk that never fills: retention for results, ``processed/`` and ``failed/``, and the
low-disk guard.

**Retention** (``retention.<folder>``: ``max_age_days``, ``max_total_mb``) removes, per
folder, entries older than the age limit and then the oldest ones until the folder fits its
size limit. An entry is one ``results/<scene_id>/`` folder, or one file of ``processed/``
or ``failed/<reason>/``; its age is the time since it arrived there (the later of mtime and
ctime: a rename into the folder sets ctime). The sweeper never removes what is not yet
published or indexed:

* a ``results/<scene_id>/`` whose scene is still claimed or processing (its cells are not
  indexed yet), or whose result or failure message still waits in the outbox;
* a file of ``processed/`` or ``failed/`` that arrived after the oldest message still
  waiting in the outbox (a failure message names the file it moved to).

The retrieval index keeps its rows: a hit whose scene's outputs were swept says so
(``outputs_present``).

**The low-disk guard** (``paths.min_free_mb``): while any folder of the box (inbox, work,
results, failed, processed, state) has less free space, no new file is claimed (files wait
in the inbox, untouched), the status says ``degraded: disk``, and the box resumes by itself
when space returns. A scene already claimed still runs; its writer fails it with
``disk-full`` rather than crash if the space runs out.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.config import FolderRetention, PathsConfig, RetentionConfig
from appliance.ingest.journal import Journal

log = logging.getLogger(__name__)

IN_FLIGHT = ("claimed", "processing")
MB = 1 << 20


@dataclass(frozen=True)
class Entry:
    """One thing retention may remove."""

    path: Path
    arrived: float  # epoch s
    size: int  # bytes


@dataclass(frozen=True)
class Swept:
    """What one sweep of one folder removed, and what it kept although over a limit."""

    folder: str
    removed: int
    freed_bytes: int
    kept_unpublished: int


class Sweeper:
    """Applies ``retention`` to the node's folders (see the module docstring)."""

    def __init__(self, paths: PathsConfig, cfg: RetentionConfig, journal: Journal,
                 keep_processed: bool = True) -> None:
        self.paths = paths
        self.cfg = cfg
        self.journal = journal
        self.keep_processed = keep_processed
        self._lock = threading.Lock()

    def sweep(self, now: float | None = None) -> list[Swept]:
        """One pass over results, processed and failed; returns what each lost."""
        now = time.time() if now is None else now
        with self._lock:
            unsent = self.journal.unsent()
            waiting_ids = {_scene_of(topic) for topic, _ in unsent} - {None}
            oldest_unsent = min((created for _, created in unsent), default=None)
            out = [self._sweep("results", _children(self.paths.results, dirs=True),
                               self.cfg.results, now,
                               lambda e: self._result_pending(e, waiting_ids))]
            for name, folder, rule in (("processed", self.paths.processed_dir,
                                        self.cfg.processed),
                                       ("failed", self.paths.failed, self.cfg.failed)):
                out.append(self._sweep(
                    name, _files_below(folder), rule, now,
                    lambda e: oldest_unsent is not None and e.arrived >= oldest_unsent))
            if self.cfg.results.max_age_days is not None:  # a job's answer outlives no result
                forgotten = self.journal.forget_jobs(now - self.cfg.results.max_age_days * 86400)
                if forgotten:
                    log.info("retention: forgot %d ended fleet job(s)", forgotten)
        for swept in out:
            if swept.removed:
                log.info("retention: removed %d from %s (%.1f MB)", swept.removed, swept.folder,
                         swept.freed_bytes / MB)
            if swept.kept_unpublished:
                log.info("retention: kept %d in %s that are not yet published or indexed",
                         swept.kept_unpublished, swept.folder)
        return out

    def _result_pending(self, entry: Entry, waiting_ids: set[str | None]) -> bool:
        scene_id = entry.path.name
        if scene_id in waiting_ids:
            return True
        record = self.journal.get(scene_id)
        return record is not None and record.state in IN_FLIGHT

    def _sweep(self, name: str, entries: list[Entry], rule: FolderRetention, now: float,
               pending: Callable[[Entry], bool]) -> Swept:
        if rule.max_age_days is None and rule.max_total_mb is None:
            return Swept(name, 0, 0, 0)
        entries = sorted(entries, key=lambda e: e.arrived)
        doomed: list[Entry] = []
        if rule.max_age_days is not None:
            cutoff = now - rule.max_age_days * 86400
            doomed = [e for e in entries if e.arrived < cutoff]
        if rule.max_total_mb is not None:
            total = sum(e.size for e in entries) - sum(e.size for e in doomed)
            for e in entries:
                if total <= rule.max_total_mb * MB:
                    break
                if e not in doomed:
                    doomed.append(e)
                    total -= e.size
        removed = freed = kept = 0
        for e in doomed:
            if pending(e):
                kept += 1
                continue
            if _remove(e.path):
                removed += 1
                freed += e.size
        return Swept(name, removed, freed, kept)


def _scene_of(topic: str) -> str | None:
    """The scene id of ``<p>/scene/<id>/<kind>`` (None for other topics)."""
    parts = topic.split("/")
    for i in range(len(parts) - 2):
        if parts[i] == "scene":
            return parts[i + 1]
    return None


def _arrived(st: os.stat_result) -> float:
    return max(st.st_mtime, st.st_ctime)


def _children(folder: Path, dirs: bool) -> list[Entry]:
    """The folders (``dirs``) directly in ``folder``, each sized with what it holds."""
    out = []
    try:
        listing = list(os.scandir(folder))
    except OSError:
        return []
    for item in listing:
        try:
            st = item.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) == dirs:
            out.append(Entry(Path(item.path), _arrived(st), _tree_size(Path(item.path))))
    return out


def _files_below(folder: Path) -> list[Entry]:
    """Every file in ``folder`` and its subfolders (``failed/<reason>/``)."""
    out = []
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = Path(root) / name
            try:
                st = path.lstat()
            except OSError:
                continue
            out.append(Entry(path, _arrived(st), st.st_size))
    return out


def _tree_size(folder: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += (Path(root) / name).lstat().st_size
            except OSError:
                continue
    return total


def _remove(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return False
    except OSError as exc:
        log.warning("retention: cannot remove %r: %s", str(path), exc)
        return False
    return True


class DiskGuard:
    """``paths.min_free_mb`` on every folder of the box; see the module docstring."""

    def __init__(self, folders: list[Path], min_free_mb: int) -> None:
        self.folders = list(dict.fromkeys(folders))
        self.min_free_mb = min_free_mb
        self._low: list[str] = []
        self._lock = threading.Lock()

    def check(self) -> list[str]:
        """The folders below ``min_free_mb`` now, as ``path (N MB free)``; logs each change
        (a WARNING when claiming stops, an INFO when it resumes)."""
        if self.min_free_mb <= 0:
            return []
        low = []
        seen: set[int] = set()
        for folder in self.folders:
            try:
                st = os.statvfs(folder)
                dev = folder.stat().st_dev
            except OSError:
                continue  # not there yet: the part that owns it creates it
            if dev in seen:
                continue
            seen.add(dev)
            free = st.f_bavail * st.f_frsize / MB
            if free < self.min_free_mb:
                low.append(f"{folder} ({free:.0f} MB free)")
        with self._lock:
            before, self._low = self._low, low
        if low and not before:
            log.warning("low disk: %s below paths.min_free_mb (%d MB): not claiming new "
                        "files until space returns", ", ".join(low), self.min_free_mb)
        elif before and not low:
            log.info("disk space is back above paths.min_free_mb (%d MB): claiming again",
                     self.min_free_mb)
        return low

    def may_claim(self) -> bool:
        return not self.check()
