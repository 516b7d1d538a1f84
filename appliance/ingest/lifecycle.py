"""A scene's life on the box, from a claimed file to a published result or a failure.

Per file (``handle``): the read attempt is counted in the journal (committed) → ``lstat``:
only a regular file no larger than ``input.max_file_bytes`` is read (symlinks, FIFOs,
devices and oversized files are refused into ``failed/<reason>/`` unread, under an id
made from their claim path) → bounded hash → journal claim → the scene's steps (``process``, then
``after``: index, drift) → result payload → journal ``finish`` (scene done + outbox row,
one transaction) → the input moves to ``processed/`` (or is deleted). A re-dropped
identical file is recognised from the journal: it is not recomputed, and its stored result
is re-announced with the *same* ``msg_id`` so a consumer that already has it can drop the
copy.

A scene named by a fleet job (``handle_source``: a URL or a shared file, read in place)
takes the same steps under its stable id, with no file of the box's own to move.

Before new work is taken, ``reconcile`` settles what a crash left behind: scenes that
crashed the daemon ``input.max_attempts`` times fail as ``crash-loop``, claimed scenes whose
file vanished fail as ``missing``, files still in ``work/`` are processed again, and results
already in the outbox are simply published (never recomputed). A job's scene is left to
the work queue, which runs it again through ``handle_source`` (its attempts still count).

The steps themselves are given to the lifecycle (``process``, ``after``), so it is tested
in-process with small fakes and knows nothing of models, indexes or drift.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Protocol

from appliance.comms.message import Message
from appliance.comms.topics import Topics
from appliance.config import InputConfig, PathsConfig
from appliance.contract.durable import atomic_write_text
from appliance.contract.payloads import DriftReport, SceneFailed, result_msg_id
from appliance.ingest.inbox import Inbox, original_name, safe_name
from appliance.ingest.journal import Journal, SceneRecord
from appliance.ingest.scene_ref import Refused, hash_regular_file
from appliance.scene.pipeline import SceneError, SceneInterrupted, SceneOutcome
from appliance.scene.source import SceneSource

log = logging.getLogger(__name__)

Outcome = Literal["done", "failed", "duplicate"]
Handled = Literal["done", "failed", "duplicate", "interrupted"]
Process = Callable[[SceneSource, str, Path], SceneOutcome]
"""(where the pixels are, scene_id, output folder) → outcome; raises ``SceneError``."""
After = Callable[[SceneOutcome], DriftReport | None]
"""A processed scene's follow-up steps (index, drift); returns its drift scores."""


class SceneObserver(Protocol):
    """Who hears of scenes starting and ending (the node's telemetry)."""

    def scene_started(self, scene_id: str) -> None: ...

    def scene_ended(self, outcome: Outcome, timings: dict[str, float] | None = None
                    ) -> None: ...


def unique_path(folder: Path, name: str) -> Path:
    """``folder/name``, or ``name-1``, ``name-2``… before the suffix if taken."""
    folder.mkdir(parents=True, exist_ok=True)
    candidate = folder / name
    stem, dot, suffix = name.partition(".")
    n = 0
    while candidate.exists():
        n += 1
        candidate = folder / f"{stem}-{n}{dot}{suffix}"
    return candidate


class SceneLifecycle:
    """Takes claimed files through the journal; see the module docstring."""

    def __init__(self, journal: Journal, inbox: Inbox, paths: PathsConfig, cfg: InputConfig,
                 topics: Topics, node_id: str, process: Process, after: After,
                 observer: SceneObserver, kick: Callable[[], None] = lambda: None) -> None:
        self.journal = journal
        self.inbox = inbox
        self.paths = paths
        self.cfg = cfg
        self.topics = topics
        self.node_id = node_id
        self._process = process
        self._after = after
        self._observer = observer
        self._kick = kick  # new outbox rows: wake the publisher

    # -- reconciliation -------------------------------------------------------------------

    def reconcile(self, stopping: Callable[[], bool] = lambda: False) -> None:
        """Settle what a crash left behind before taking new work (see module docstring)."""
        for scene in self.journal.scenes("claimed", "processing"):
            try:  # one bad scene never stops the start
                self._settle(scene)
            except Exception:
                log.exception("could not settle scene %s (%r)", scene.scene_id[:12], scene.source)
        self.retry_stuck(stopping)
        pending = self.journal.outbox_depth()
        if pending:
            log.info("%d message(s) in the outbox will be published", pending)
        self._kick()

    def _settle(self, scene: SceneRecord) -> None:
        path = scene.work_path
        if path is None and self.journal.job_waits_on(scene.scene_id):
            return  # read in place for a fleet job: the work queue takes it up (and counts)
        if scene.state == "processing" and scene.attempts >= self.cfg.max_attempts:
            log.error("scene %s (%r) crashed the daemon %d times: failing it",
                      scene.scene_id[:12], scene.source, scene.attempts)
            self._fail(scene, path if path and os.path.lexists(path) else None, "crash-loop",
                       f"the daemon died {scene.attempts} times while processing this scene")
        elif path is None or not os.path.lexists(path):
            self._fail(scene, None, "missing", "the claimed file disappeared from work/")

    def retry_stuck(self, stopping: Callable[[], bool] = lambda: False) -> None:
        """Files left in ``work/`` by a crash or by an error outside the scene step
        (reconciliation, then the loop between scenes): each is handled again; its
        attempts still count. A stop request leaves the rest for the next start."""
        for work in self.inbox.claimed():
            if stopping():
                break
            self.handle_guarded(work, recovering=True)

    # -- one scene ------------------------------------------------------------------------

    def handle_guarded(self, work: Path, recovering: bool = False) -> None:
        """``handle``, but an unexpected error (disk full, I/O) costs one file, not the box.

        The file stays in ``work/``; ``retry_stuck`` (the main loop) takes it up again.
        """
        try:
            self.handle(work, recovering)
        except Exception:
            log.exception("could not handle %r; it stays in work/ and is retried", str(work))

    def handle(self, work: Path, recovering: bool = False) -> Handled:
        """Process one claimed file; returns how it ended."""
        source = safe_name(original_name(work))
        reads = self.journal.attempt(work)  # counted before any byte is read
        try:
            if reads > self.cfg.max_attempts:
                raise Refused("crash-loop", f"the daemon died {reads - 1} times reading this file")
            try:
                st = os.lstat(work)
            except FileNotFoundError:
                raise Refused("missing", "the claimed file disappeared from work/") from None
            if not stat.S_ISREG(st.st_mode):
                raise Refused("not-a-file", "not a regular file (a symlink, FIFO or device)")
            if st.st_size > self.cfg.max_file_bytes:
                raise Refused("too-large", f"{st.st_size} bytes is larger than "
                               f"input.max_file_bytes ({self.cfg.max_file_bytes})")
            scene_id = hash_regular_file(work, self.cfg.max_file_bytes)
        except Refused as exc:
            self._refuse(work, source, exc.reason, exc.message, reads)
            return "failed"
        return self._run(scene_id, source, SceneSource.file(work), work,
                         announce=not recovering)

    def handle_source(self, source: SceneSource, scene_id: str) -> Handled:
        """Process a scene named by reference (a fleet job: a URL or a shared file) under
        its stable ``scene_id``: the same steps, journal and outbox as an inbox file, with
        no file of the box's own to move. A done scene is re-announced, not recomputed."""
        return self._run(scene_id, safe_name(source.location), source, None, announce=True)

    def _run(self, scene_id: str, source: str, pixels: SceneSource, work: Path | None,
             announce: bool) -> Handled:
        """A scene's steps after its identity is known; ``work`` is the box's own copy
        (moved to processed/ or failed/ at the end), None for a scene read in place."""
        scene = self.journal.claim(scene_id, source, work)
        if scene.state == "done":
            self._duplicate(scene, work, announce=announce)
            return "duplicate"
        if scene.state == "processing" and scene.attempts >= self.cfg.max_attempts:
            self._fail(scene, work, "crash-loop",
                       f"processing this scene failed {scene.attempts} times")
            return "failed"
        attempts = self.journal.start(scene_id)
        log.info("scene %s (%r): attempt %d", scene_id[:12], source, attempts)
        self._observer.scene_started(scene_id)
        try:
            outcome = self._process(pixels, scene_id, self.paths.results / scene_id)
        except SceneInterrupted:
            # A stop request: the file stays in work/ (a job stays open), the attempt is
            # not a crash, the next start takes it up again.
            self.journal.unstart(scene_id)
            log.info("scene %s (%r): interrupted by a stop; taken up again at the next start",
                     scene_id[:12], source)
            return "interrupted"
        except SceneError as exc:
            self._fail(scene, work, exc.reason, exc.message, attempts)
            return "failed"
        except Exception as exc:  # a bug or a resource error must not stop the box
            log.exception("scene %s (%r): unexpected error", scene_id[:12], source)
            self._fail(scene, work, "error", f"{type(exc).__name__}: {exc}", attempts)
            return "failed"
        drift = self._after(outcome)
        result = outcome.result(self.node_id, drift)
        self.journal.finish(scene_id, Message(result.msg_id, self.topics.scene(scene_id, "result"),
                                              result.to_json()))
        self._kick()
        if work is not None:
            self._dispose(work)
        self._observer.scene_ended("done", outcome.timings)
        log.info("scene %s (%r): done in %.2fs, %d tiles", scene_id[:12], source,
                 outcome.timings.get("total", 0.0), outcome.tiles)
        return "done"

    def _duplicate(self, scene: SceneRecord, work: Path | None, announce: bool) -> None:
        """A file whose scene is already done: keep the old result, re-announce it."""
        log.info("scene %s (%r): already done, not recomputed", scene.scene_id[:12], scene.source)
        if announce and scene.result is not None:
            self.journal.enqueue(Message(result_msg_id(scene.scene_id),
                                         self.topics.scene(scene.scene_id, "result"),
                                         scene.result))
            self._kick()
        if work is not None:
            self._dispose(work)
        self._observer.scene_ended("duplicate")

    def _fail(self, scene: SceneRecord, work: Path | None, reason: str, text: str,
              attempts: int | None = None) -> None:
        """Sidecar and file into ``failed/<reason>/`` first, then journal + failed message.

        In this order a consumer that reacts to ``failed`` finds the file where the message
        says. A crash between the two leaves the file in ``failed/`` and the scene
        ``processing``; reconciliation then reports it as ``missing``.
        """
        target = unique_path(self.paths.failed / reason, original_name(work)) if work else None
        payload = SceneFailed(node_id=self.node_id, scene_id=scene.scene_id,
                              source=scene.source, reason=reason, message=text,
                              moved_to=safe_name(str(target)) if target else None,
                              attempts=attempts if attempts is not None else scene.attempts)
        if work is not None and target is not None:
            sidecar = target.with_name(target.name + ".json")
            atomic_write_text(sidecar, json.dumps(json.loads(payload.to_json()), indent=2) + "\n")
            os.replace(work, target)
            self.inbox.release(work)
        self.journal.fail(scene.scene_id, reason, text,
                          Message(payload.msg_id, self.topics.scene(scene.scene_id, "failed"),
                                  payload.to_json()))
        self._kick()
        self._observer.scene_ended("failed")
        log.warning("scene %s (%r): failed (%s): %r", scene.scene_id[:12], scene.source,
                    reason, text)

    def _refuse(self, work: Path, source: str, reason: str, text: str, attempts: int) -> None:
        """A claimed file that never became a scene: into ``failed/<reason>/`` unread, with a
        journal row and a failed message under an id made from its claim path."""
        scene_id = hashlib.sha256(b"unread\0" + os.fsencode(work)).hexdigest()
        target = None
        if os.path.lexists(work):
            target = unique_path(self.paths.failed / reason, original_name(work))
        payload = SceneFailed(node_id=self.node_id, scene_id=scene_id, source=source,
                              reason=reason, message=text,
                              moved_to=safe_name(str(target)) if target else None,
                              attempts=attempts)
        if target is not None:
            sidecar = target.with_name(target.name + ".json")
            atomic_write_text(sidecar, json.dumps(json.loads(payload.to_json()), indent=2) + "\n")
            os.replace(work, target)
        self.inbox.release(work)
        self.journal.refuse(scene_id, source, work, reason, text, attempts,
                            Message(payload.msg_id, self.topics.scene(scene_id, "failed"),
                                    payload.to_json()))
        self._kick()
        self._observer.scene_ended("failed")
        log.warning("file %r: refused (%s): %r", source, reason, text)

    def _dispose(self, work: Path) -> None:
        """The input of a finished scene moves to ``processed/`` or is deleted."""
        if self.cfg.keep_processed:
            os.replace(work, unique_path(self.paths.processed_dir, original_name(work)))
        else:
            work.unlink(missing_ok=True)
        self.inbox.release(work)
