"""The composition root: the one place that builds every part and wires them together.

Start-up order (``Daemon.setup``): config → model store (the seed ``model.bundle`` is
installed on first start) → runtime (+ warm-up) → journal → MQTT comms → reconciliation
→ READY. Reconciliation finishes what a crash left behind before new work is taken:
scenes that crashed the daemon ``input.max_attempts`` times fail as ``crash-loop``, files
still in ``work/`` are processed again, and results already in the outbox are simply
published (never recomputed) by the comms publisher.

Per scene (``handle``): hash → journal claim → ``process_scene`` → index → drift →
result payload → journal ``finish`` (scene done + outbox row, one transaction) → the
input moves to ``processed/`` (or is deleted). A re-dropped identical file is recognised
from the journal: it is not recomputed, and its stored result is re-announced with the
*same* ``msg_id`` so a consumer that already has it can drop the copy.

The main loop runs scenes, commands and stats one after another; MQTT command handlers
only queue work for it (``submit``). Two things run beside it on purpose: retrieval
queries are answered on the comms handler thread (the index takes its own lock), and an
adaptation job trains on its own thread and hands its outcome back through ``submit``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from types import FrameType

from appliance.adapt.adapter import Adapter
from appliance.adapt.drift import DriftMonitor
from appliance.comms.message import Message
from appliance.comms.mqtt import Comms
from appliance.config import Settings
from appliance.contract.bundle import Bundle, BundleError, sha256_file
from appliance.contract.durable import atomic_write_text
from appliance.contract.payloads import (
    AdaptationReport,
    ClassShare,
    DriftEvent,
    DriftReport,
    ModelEvent,
    ModelRef,
    SceneFailed,
    SceneResult,
    StatsPayload,
    StatusPayload,
    result_msg_id,
)
from appliance.ingest.inbox import Inbox
from appliance.ingest.journal import Journal, Scene
from appliance.model.runtime import Experts, open_runtime
from appliance.model.store import open_store
from appliance.retrieval.index import IndexStateError, TileIndex
from appliance.retrieval.service import RetrievalService
from appliance.scene.pipeline import SceneError, SceneOutcome, process_scene
from appliance.systemd import Notifier

log = logging.getLogger(__name__)

EX_CONFIG = 78  # sysexits: the unit's RestartPreventExitStatus, restarting will not help


def software_version() -> str:
    try:
        return version("terratile")
    except PackageNotFoundError:
        return "unknown"


def build_result(outcome: SceneOutcome, bundle: Bundle, node_id: str,
                 drift: DriftReport | None) -> SceneResult:
    """The ``scene-result/1`` payload of a processed scene (msg_id derived from its id)."""
    return SceneResult(
        msg_id=result_msg_id(outcome.scene_id), node_id=node_id,
        scene_id=outcome.scene_id, source=outcome.source,
        model=ModelRef(name=bundle.manifest.name, version=bundle.version,
                       domain=outcome.cells.domain),
        crs=outcome.crs, bounds=outcome.bounds, bounds_wgs84=outcome.bounds_wgs84,
        width=outcome.width, height=outcome.height,
        classes={name: ClassShare(fraction=outcome.fractions[name],
                                  area_ha=outcome.areas_ha.get(name, 0.0))
                 for name in outcome.fractions},
        mean_confidence=outcome.mean_confidence, outputs=outcome.outputs,
        timings=outcome.timings, tiles=outcome.tiles, drift=drift,
    )


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


class Daemon:
    """The appliance process: see the module docstring for the order of things."""

    def __init__(self, settings: Settings, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.notifier = notifier or Notifier()
        self.state = "starting"
        self._stop = threading.Event()
        self._tasks: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._busy_since: float | None = None
        self._started = time.monotonic()
        self._counters = {"done": 0, "failed": 0, "duplicates": 0}
        self._timings: list[dict[str, float]] = []
        paths = settings.paths
        for folder in (paths.outbox, paths.failed, paths.state):
            folder.mkdir(parents=True, exist_ok=True)
        self.journal = Journal(paths.state / "journal.sqlite")
        self.inbox = Inbox(paths.inbox, paths.work_dir, settings.input.settle_seconds,
                           settings.input.rescan_seconds)
        self.store = open_store(settings)
        self.bundle = self.store.active()
        self.runtime = open_runtime(self.bundle, settings)
        self.comms = (Comms(settings.mqtt, settings.node_id, self.journal, self.status_json)
                      if settings.mqtt.enabled else None)
        self.index = self._open_index()
        self._open_adaptation()
        self._register_commands()
        self._register_requests()

    # -- hooks wired by the other parts (one small method each) -------------------------

    def _open_index(self) -> TileIndex | None:
        """The retrieval index, or None while retrieval is off or its files do not fit."""
        if not self.settings.retrieval.enabled:
            return None
        try:
            return TileIndex(self.settings.paths.state, self.settings.retrieval,
                             self.bundle.manifest.embedding_dim)
        except IndexStateError as exc:  # e.g. a model with another embedding size
            log.error("retrieval disabled: %s", exc)
            return None

    def _index_scene(self, outcome: SceneOutcome) -> None:
        """(a) After a scene's outcome: its cells go into the retrieval index."""
        if self.index is not None:
            self.index.add_scene(outcome, self.bundle.manifest.class_names)

    def _open_adaptation(self) -> None:
        """(e) Drift monitor and adapter; both keep their state under ``paths.state``."""
        s = self.settings
        self.drift = (DriftMonitor(self.bundle.reference, s.drift, s.paths.state,
                                   self.bundle.domain_references())
                      if s.drift.enabled else None)
        self.adapter = (Adapter(self.store, s.adapt, s.paths.state, s.tiling)
                        if s.adapt.enabled else None)
        self._drifting = self.drift.status().drifting if self.drift is not None else False

    def _drift_for(self, outcome: SceneOutcome) -> DriftReport | None:
        """(b) Collect the scene's cells, score drift; publish a change, start a job if due."""
        if self.adapter is not None:
            self.adapter.collect(outcome.cells, self.bundle)
        if self.drift is None:
            return None
        report = self.drift.observe(outcome.cells)
        if report.drifting != self._drifting and self.comms is not None:
            event = DriftEvent(node_id=self.settings.node_id, scene_id=outcome.scene_id,
                               report=report)
            self.comms.send("events/drift", event.to_json(), event.msg_id)
        self._drifting = report.drifting
        if self.adapter is not None and self.adapter.due(report.drifting, self.bundle):
            self._start_adaptation("drift")
        return report

    def _start_adaptation(self, reason: str) -> None:
        """Run a gated job on a background thread; its outcome is applied on the main loop."""
        adapter = self.adapter
        if adapter is None or adapter.running:
            log.info("adaptation (%s) not started: %s", reason,
                     "disabled" if adapter is None else "a job is running")
            return

        def job() -> None:
            report = self._apply(adapter.run(self.bundle, reason))
            experts = None
            if report.model_changed:  # sessions (and TensorRT engines) built here, not on
                bundle = self.store.active()  # the loop that ingests scenes
                experts = self.runtime.open_experts(
                    bundle, self.settings.tiling.batch_size if self.settings.model.warmup else 0)
            self.submit(lambda: self._adapted(report, experts))

        threading.Thread(target=job, name="adaptation", daemon=True).start()

    def _apply(self, report: AdaptationReport) -> AdaptationReport:
        """Install and activate what a job proposes (interim: ModelHost will own this)."""
        if report.promoted and report.candidate is not None:
            bundle = self.store.install(Path(report.candidate), activate=True)
            pruned = self.store.prune(self.settings.adapt.keep_versions)
            if pruned:
                log.info("pruned model versions %s", pruned)
        elif report.action == "reset" and report.reset_to is not None:
            bundle = self.store.activate(report.reset_to)
        else:
            return report
        return report.model_copy(update={"version_after": bundle.version,
                                         "bundle_path": str(bundle.path)})

    def _adapted(self, report: AdaptationReport, experts: Experts | None = None) -> None:
        """A job finished: swap in a promoted (or reset) version with the sessions the job
        thread opened for it; publish what happened."""
        if report.model_changed:
            self._switch_model(self.store.active(), "adapted" if report.promoted else "reset",
                               report, experts)
        elif report.action == "rejected" and self.comms is not None:
            event = ModelEvent(node_id=self.settings.node_id, action="rejected",
                               model=ModelRef(name=self.bundle.manifest.name,
                                              version=self.bundle.version),
                               detail=report)
            self.comms.send("events/model", event.to_json(), event.msg_id)

    def _rollback(self) -> None:
        """``cmd/rollback``: activate the parent version and run it."""
        try:
            bundle = self.store.rollback()
        except BundleError as exc:
            log.error("rollback refused: %s", exc)
            return
        self._switch_model(bundle, "rollback", None)

    def _switch_model(self, bundle: Bundle, action: str, detail: AdaptationReport | None,
                      experts: Experts | None = None) -> None:
        """Run ``bundle``: only experts are swapped when backbone and embedder are the same."""
        previous = self.bundle
        if not self.runtime.adopt(bundle, experts):
            self.runtime = open_runtime(bundle, self.settings)
        self.bundle = bundle
        if self.drift is not None:
            self.drift.switch_model(bundle)
        log.info("model v%d → v%d (%s)", previous.version, bundle.version, action)
        if self.comms is not None:
            event = ModelEvent(node_id=self.settings.node_id, action=action,
                               model=ModelRef(name=bundle.manifest.name, version=bundle.version),
                               previous=ModelRef(name=previous.manifest.name,
                                                 version=previous.version), detail=detail)
            self.comms.send("events/model", event.to_json(), event.msg_id)
        self._set_state(self.state, force=True)

    def _register_commands(self) -> None:
        """(c) ``<p>/cmd/<verb>`` handlers; each queues its work for the main loop."""
        if self.comms is None:
            return
        self.comms.on_command("reload", lambda _payload: self.submit(self.reload))
        self.comms.on_command("rescan", lambda _payload: self.submit(self.inbox.rescan))
        self.comms.on_command("rollback", lambda _payload: self.submit(self._rollback))
        self.comms.on_command(
            "adapt", lambda _payload: self.submit(lambda: self._start_adaptation("command")))

    def _register_requests(self) -> None:
        """(d) Request/response topics (``retrieval/query`` → RetrievalService).

        Queries are answered on the comms handler thread, not queued: TileIndex takes its
        own lock and onnxruntime sessions are thread-safe, so a query never waits for a scene.
        """
        if self.comms is None or self.index is None:
            return
        service = RetrievalService(self.index, self.settings.retrieval, lambda: self.runtime,
                                   self.settings.node_id, self.settings.input.bands)
        self.comms.on_request("retrieval/query", service.handle_request)

    # -- lifecycle ----------------------------------------------------------------------

    def submit(self, task: Callable[[], None]) -> None:
        """Run ``task`` on the main loop between scenes (thread-safe)."""
        self._tasks.put(task)
        self.inbox.wake()

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        """Finish the current scene, then stop (SIGTERM, SIGINT)."""
        log.info("stop requested%s", f" (signal {signum})" if signum else "")
        self._stop.set()
        self.inbox.wake()

    def setup(self) -> None:
        """Connect, reconcile, declare READY."""
        self.notifier.status("reconciling journal")
        if self.comms is not None:
            self.comms.start()
        self.reconcile()
        self.inbox.start()
        self._set_state("ready")
        self.notifier.ready(self._status_line())
        log.info("ready: watching %s", self.settings.paths.inbox)

    def run(self) -> int:
        """The main loop until SIGTERM; returns the process exit code."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        keeper = self._start_watchdog_keeper()
        try:
            self.setup()
            next_stats = time.monotonic()
            while not self._stop.is_set():
                self.notifier.watchdog()
                self._run_tasks()
                for path in self.inbox.ready():
                    if self._stop.is_set():
                        break
                    self.notifier.watchdog()
                    work = self.inbox.claim(path)
                    if work is not None:
                        self._handle_guarded(work)
                    self._run_tasks()
                self._set_state("ready")
                if time.monotonic() >= next_stats:
                    self.publish_stats()
                    next_stats = time.monotonic() + self.settings.mqtt.stats_interval
                self.inbox.wait(min(self.inbox.next_check(), self._tick()))
        finally:
            self.shutdown()
            if keeper is not None:
                keeper.set()
        return 0

    def shutdown(self) -> None:
        self.notifier.stopping()
        self._set_state("stopping")
        self.inbox.stop()
        if self.comms is not None:
            self.comms.stop()
        if self.index is not None:
            self.index.close()
        self.journal.close()
        log.info("stopped")

    def _tick(self) -> float:
        """Longest sleep of the main loop: short enough for the watchdog."""
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

    def _start_watchdog_keeper(self) -> threading.Event | None:
        """Feed the watchdog during one long scene, up to ``input.max_scene_seconds``.

        A scene that runs longer is taken as hung: the pings stop, systemd restarts the
        service, and the journal's attempt count turns a repeat into ``crash-loop``.
        """
        interval = self.notifier.watchdog_interval
        if interval is None:
            return None
        done = threading.Event()

        def keep() -> None:
            while not done.wait(interval / 2):
                since = self._busy_since
                if since is not None and time.monotonic() - since < (
                        self.settings.input.max_scene_seconds):
                    self.notifier.watchdog()

        threading.Thread(target=keep, name="watchdog", daemon=True).start()
        return done

    # -- reconciliation -----------------------------------------------------------------

    def reconcile(self) -> None:
        """Settle what a crash left behind before taking new work (see module docstring)."""
        max_attempts = self.settings.input.max_attempts
        for scene in self.journal.scenes("claimed", "processing"):
            path = scene.work_path
            if scene.state == "processing" and scene.attempts >= max_attempts:
                log.error("scene %s (%s) crashed the daemon %d times: failing it",
                          scene.scene_id[:12], scene.source, scene.attempts)
                self._fail(scene, path if path and path.exists() else None, "crash-loop",
                           f"the daemon died {scene.attempts} times while processing this scene")
            elif path is None or not path.exists():
                self._fail(scene, None, "missing", "the claimed file disappeared from work/")
        for work in self.inbox.claimed():
            if self._stop.is_set():
                break  # SIGTERM during recovery: the rest waits in work/ for the next start
            self.handle(work, recovering=True)
        pending = self.journal.outbox_depth()
        if pending:
            log.info("%d message(s) in the outbox will be published", pending)
        if self.comms is not None:
            self.comms.kick()

    # -- one scene ----------------------------------------------------------------------

    def _handle_guarded(self, work: Path) -> None:
        """``handle``, but an unexpected error (disk full, I/O) costs one file, not the box.

        The file stays in ``work/``; the next start's reconciliation takes it up again.
        """
        try:
            self.handle(work)
        except Exception:
            log.exception("could not handle %s; it stays in work/ until the next start", work)

    def handle(self, work: Path, recovering: bool = False) -> str:
        """Process one claimed file; returns its final state (done, failed, duplicate)."""
        source = work.name
        scene_id = sha256_file(work)
        scene = self.journal.claim(scene_id, source, work)
        if scene.state == "done":
            self._duplicate(scene, work, announce=not recovering)
            return "duplicate"
        attempts = self.journal.start(scene_id)
        self._set_state("processing")
        log.info("scene %s (%s): attempt %d", scene_id[:12], source, attempts)
        self._busy_since = time.monotonic()
        try:
            outcome = process_scene(work, scene_id, self.settings.paths.outbox / scene_id,
                                    self.runtime, self.settings,
                                    probe_sharpness=self.settings.adapt.enabled,
                                    embedding_scale=self.settings.retrieval.scale)
        except SceneError as exc:
            self._fail(scene, work, exc.reason, exc.message, attempts)
            return "failed"
        except Exception as exc:  # a bug or a resource error must not stop the box
            log.exception("scene %s (%s): unexpected error", scene_id[:12], source)
            self._fail(scene, work, "error", f"{type(exc).__name__}: {exc}", attempts)
            return "failed"
        finally:
            self._busy_since = None
        self._index_scene(outcome)
        drift = self._drift_for(outcome)
        result = build_result(outcome, self.bundle, self.settings.node_id, drift)
        self.journal.finish(scene_id, Message(result.msg_id, self._topic(scene_id, "result"),
                                              result.to_json()))
        if self.comms is not None:
            self.comms.kick()
        self._dispose(work)
        self._counters["done"] += 1
        self._timings = [*self._timings[-19:], outcome.timings]
        log.info("scene %s (%s): done in %.2fs, %d tiles", scene_id[:12], source,
                 outcome.timings.get("total", 0.0), outcome.tiles)
        return "done"

    def _topic(self, scene_id: str, kind: str) -> str:
        prefix = f"{self.settings.mqtt.topic_prefix}/{self.settings.node_id}"
        return f"{prefix}/scene/{scene_id}/{kind}"

    def _duplicate(self, scene: Scene, work: Path, announce: bool) -> None:
        """A file whose scene is already done: keep the old result, re-announce it."""
        log.info("scene %s (%s): already done, not recomputed", scene.scene_id[:12], work.name)
        if announce and scene.result is not None:
            self.journal.enqueue(Message(result_msg_id(scene.scene_id),
                                         self._topic(scene.scene_id, "result"), scene.result))
            if self.comms is not None:
                self.comms.kick()
        self._dispose(work)
        self._counters["duplicates"] += 1

    def _fail(self, scene: Scene, work: Path | None, reason: str, text: str,
              attempts: int | None = None) -> None:
        """Sidecar and file into ``failed/<reason>/`` first, then journal + failed message.

        In this order a consumer that reacts to ``failed`` finds the file where the message
        says. A crash between the two leaves the file in ``failed/`` and the scene
        ``processing``; reconciliation then reports it as ``missing``.
        """
        target = unique_path(self.settings.paths.failed / reason, scene.source) if work else None
        payload = SceneFailed(node_id=self.settings.node_id, scene_id=scene.scene_id,
                              source=scene.source, reason=reason, message=text,
                              moved_to=str(target) if target else None,
                              attempts=attempts if attempts is not None else scene.attempts)
        if work is not None and target is not None:
            sidecar = target.with_name(target.name + ".json")
            atomic_write_text(sidecar, json.dumps(json.loads(payload.to_json()), indent=2) + "\n")
            os.replace(work, target)
            self.inbox.release(work)
        self.journal.fail(scene.scene_id, reason, text,
                          Message(payload.msg_id, self._topic(scene.scene_id, "failed"),
                                  payload.to_json()))
        if self.comms is not None:
            self.comms.kick()
        self._counters["failed"] += 1
        log.warning("scene %s (%s): failed (%s): %s", scene.scene_id[:12], scene.source,
                    reason, text)

    def _dispose(self, work: Path) -> None:
        """The input of a finished scene moves to ``processed/`` or is deleted."""
        if self.settings.input.keep_processed:
            target = unique_path(self.settings.paths.processed_dir, work.name)
            os.replace(work, target)
        else:
            work.unlink(missing_ok=True)
        self.inbox.release(work)

    # -- commands -----------------------------------------------------------------------

    def reload(self) -> None:
        """Re-read the store's active version (after ``terratile models activate``)."""
        bundle = self.store.active()
        if bundle.version == self.bundle.version:
            log.info("reload: model v%d already active", bundle.version)
            return
        self._switch_model(bundle, "reload", None)

    # -- status and stats ---------------------------------------------------------------

    def _set_state(self, state: str, force: bool = False) -> None:
        if state == self.state and not force:
            return
        self.state = state
        self.notifier.status(self._status_line())
        if self.comms is not None:
            self.comms.publish_status()

    def _status_line(self) -> str:
        return (f"{self.state}; model {self.bundle.manifest.name} v{self.bundle.version}; "
                f"queue {self.inbox.depth()}; done {self._counters['done']}, "
                f"failed {self._counters['failed']}")

    def status_json(self) -> str:
        """The retained status payload (called by comms on every reconnect)."""
        return StatusPayload(
            node_id=self.settings.node_id, state=self.state,
            model=ModelRef(name=self.bundle.manifest.name, version=self.bundle.version),
            providers=self.runtime.providers, queue_depth=self.inbox.depth(),
            counts=self.journal.counts(), version=software_version(),
            drift=(self.drift.status().model_copy(update={
                "adapting": self.adapter is not None and self.adapter.running})
                if self.drift is not None else None),
        ).to_json()

    def publish_stats(self) -> None:
        if self.comms is None:
            return
        keys = sorted({k for t in self._timings for k in t})
        means = {k: sum(t.get(k, 0.0) for t in self._timings) / len(self._timings)
                 for k in keys} if self._timings else {}
        payload = StatsPayload(node_id=self.settings.node_id,
                               uptime_s=round(time.monotonic() - self._started, 3),
                               counters=dict(self._counters), timings=means,
                               outbox_depth=self.journal.outbox_depth(),
                               queue_depth=self.inbox.depth())
        self.comms.publish_stats(payload.to_json())


def run_daemon(settings: Settings) -> int:
    """``terratile run``: build the daemon and run it until SIGTERM.

    A daemon that cannot start (no usable model, unreadable bundle) exits with
    ``EX_CONFIG`` so the unit's ``RestartPreventExitStatus`` stops a pointless restart loop.
    """
    try:
        daemon = Daemon(settings)
    except (BundleError, FileNotFoundError) as exc:
        log.error("cannot start: %s", exc)
        return EX_CONFIG
    return daemon.run()
