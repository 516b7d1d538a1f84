"""The composition root: the one place that builds every part and wires them together.

``App.build`` and ``App.start`` read as the node's table of contents, in start-up order;
``App.stop`` undoes them in reverse. Every part is usable alone and receives its
collaborators here; nothing else imports across subsystems.

The main loop (``appliance.loop``) runs scenes, queued tasks and stats one after another;
MQTT command handlers only queue work for it (``submit``). Two things run beside it on
purpose: retrieval queries are answered on the comms handler thread (the index takes its
own lock and onnxruntime sessions are thread-safe, so a query never waits for a scene),
and an adaptation job trains, installs and warms its proposal on its own thread, and
hands the switch back through ``submit``.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from appliance.adapt.adapter import Adapter
from appliance.adapt.drift import DriftMonitor
from appliance.adapt.job import AdaptationJobs
from appliance.comms.mqtt import Comms
from appliance.comms.topics import (
    DRIFT_EVENTS,
    MODEL_EVENTS,
    RETRIEVAL_QUERY,
    FleetTopics,
    Topics,
)
from appliance.config import EX_CONFIG, ConfigError, Settings, load_settings
from appliance.contract.bundle import BundleError
from appliance.contract.durable import StateLock
from appliance.contract.payloads import (
    AdaptationReport,
    DriftEvent,
    DriftReport,
    ExpertUse,
    ModelEvent,
    ModelRef,
)
from appliance.http.server import HTTPServer, node_server
from appliance.ingest.inbox import Inbox
from appliance.ingest.journal import Journal, JournalCorrupt
from appliance.ingest.lifecycle import SceneLifecycle
from appliance.ingest.retention import DiskGuard, Sweeper
from appliance.ingest.work_queue import WorkQueue
from appliance.logs import setup_logging
from appliance.loop import MainLoop, Periodic
from appliance.model.commands import ModelCommands, ModelNotice
from appliance.model.host import ModelHost, Switch
from appliance.model.install import Installer, InstallRequest, check_seed
from appliance.retrieval.index import IndexStateError, TileIndex, stored_dim
from appliance.retrieval.service import RetrievalService
from appliance.scene.pipeline import SceneOutcome, process_scene
from appliance.scene.source import SceneSource
from appliance.systemd import Notifier
from appliance.telemetry import State, Telemetry

log = logging.getLogger(__name__)

UMASK = 0o027
ADAPTATION_STOP_WAIT = 30.0  # seconds a stop waits for a running adaptation job
LIVE_SECTIONS = frozenset({"log_level", "logging", "retention"})  # + paths.min_free_mb


class StartError(RuntimeError):
    """The node cannot start as configured (restarting will not help)."""


class App:
    """The appliance process: build, start, run until SIGTERM, stop."""

    def __init__(self, settings: Settings, notifier: Notifier | None = None,
                 config_path: Path | None = None) -> None:
        self.settings = settings
        self.config_path = config_path  # re-read on SIGHUP
        self.notifier = notifier or Notifier()
        self.comms: Comms | None = None
        self.index: TileIndex | None = None
        self.drift: DriftMonitor | None = None
        self.jobs: AdaptationJobs | None = None
        self.job_left_running = False  # an adaptation job outlived stop (see run_daemon)
        self.retrieval: RetrievalService | None = None
        self.http: HTTPServer | None = None
        self.model_commands: ModelCommands | None = None
        self.work_queue: WorkQueue | None = None
        self._drifting = False
        self._start_news: list[Switch | ModelNotice] = []  # announced once MQTT is up

    # -- the table of contents --------------------------------------------------------------

    def build(self) -> None:
        """Every part, in dependency order; raises ``StartError``, ``BundleError`` or
        ``FileNotFoundError`` when the node cannot start as configured."""
        self.init_folders()
        self.init_state_lock()
        self.init_journal()
        self.init_inbox()
        self.init_model_host()
        self.init_retrieval_index()
        self.init_drift_monitor()
        self.init_adaptation()
        self.init_telemetry()
        self.init_comms()
        self.init_scene_lifecycle()
        self.init_work_queue()
        self.init_model_commands()
        self.init_http()
        self.wire_model_switches()
        self.register_commands()
        self.register_requests()

    def start(self) -> None:
        """Connect, settle what a crash left behind, watch the inbox, declare READY."""
        self.notifier.status("reconciling journal")
        self.start_comms()
        if self.http is not None:
            self.http.start()
        for news in self._start_news:  # fallback, seed bundle installed or reported
            self._announce(news)
        self.lifecycle.reconcile(lambda: self.loop.stopping)
        if self.work_queue is not None:
            self.work_queue.resume()
        self.inbox.start()
        self.telemetry.set_state(State.READY)
        self.notifier.ready(self.telemetry.status_line())
        log.info("ready: watching %s", self.settings.paths.inbox)

    def stop(self) -> None:
        """``start`` and ``build`` undone, in reverse."""
        self.notifier.stopping()
        self.telemetry.set_state(State.STOPPING)
        self.inbox.stop()
        if self.jobs is not None:
            self.job_left_running = not self.jobs.stop(timeout=ADAPTATION_STOP_WAIT)
        if self.model_commands is not None:
            self.model_commands.close()
        if self.http is not None:
            self.http.stop()
        if self.comms is not None:
            self.comms.stop()
        if self.index is not None:
            self.index.close()
        self.journal.close()
        self.lock.release()
        log.info("stopped")

    # -- building ---------------------------------------------------------------------------

    def init_folders(self) -> None:
        paths = self.settings.paths
        for folder in (paths.results, paths.failed, paths.state):
            folder.mkdir(parents=True, exist_ok=True)

    def init_state_lock(self) -> None:
        """One daemon per state folder; the CLI's model commands respect it too."""
        self.lock = StateLock(self.settings.paths.state)
        if not self.lock.acquire():
            raise StartError(f"another terratile daemon holds {self.lock.path}")

    def init_journal(self) -> None:
        """The scene states and the outbox; a damaged journal stops the start (it is never
        removed automatically: it may hold results not yet sent)."""
        try:
            self.journal = Journal(self.settings.paths.state / "journal.sqlite")
        except JournalCorrupt as exc:
            raise StartError(str(exc)) from exc

    def init_inbox(self) -> None:
        """The watched drop zone, claiming only while every folder has
        ``paths.min_free_mb`` free, and the loop that takes its files one after another."""
        s = self.settings
        self.inbox = Inbox(s.paths.inbox, s.paths.work_dir, s.input.settle_seconds,
                           s.input.rescan_seconds)
        p = s.paths
        self.disk = DiskGuard([p.inbox, p.work_dir, p.results, p.failed, p.processed_dir,
                               p.state], p.min_free_mb)
        self.inbox.gate_claims(self.disk.may_claim)
        self.sweeper = Sweeper(p, s.retention, self.journal, s.input.keep_processed)
        self.loop = MainLoop(self.notifier, self.inbox,
                             s.input.max_scene_seconds)

    def init_model_host(self) -> None:
        """The store (seeded from ``model.bundle`` on first start) and a warmed runtime of
        a version that verifies and fits (band count, tiling, the index's embedding size);
        then ``model.bundle`` compared with what is installed."""
        s = self.settings
        index_dim = stored_dim(s.paths.state) if s.retrieval.enabled else None
        self.host = ModelHost.open(s, index_dim=index_dim)
        if self.host.fallback is not None:
            self._start_news.append(self.host.fallback)
        self._start_news.extend(self.adopt_seed())
        log.info("model %s v%d on %s", self.host.bundle.manifest.name, self.host.bundle.version,
                 self.host.runtime.providers)

    def adopt_seed(self) -> list[Switch | ModelNotice]:
        """A ``model.bundle`` unlike every installed version is reported loudly (it does
        not run), or installed and run when ``model.install_newer`` and it is newer.
        Returns what to announce."""
        s = self.settings
        seed = check_seed(self.host, s.model.bundle)
        if seed is None or seed.installed:
            return []
        source = str(seed.bundle)
        if seed.problem is None and seed.newer and s.model.install_newer:
            try:
                installed = Installer(self.host, s.model, confined=False).install(
                    InstallRequest(source))
                return [self.host.switch(self.host.stage(installed.bundle.version), "install",
                                         source=source)]
            except BundleError as exc:
                log.error("model.bundle %s (model.install_newer) not installed: %s", source, exc)
                return [ModelNotice("refused", "start", str(exc), source=source)]
        why = seed.problem or (
            f"model.bundle {source} (v{seed.version}) differs from every installed version "
            f"and does not run; v{self.host.bundle.version} runs. Install it with "
            "`terratile models install` or cmd/install"
            + (", or set model.install_newer: true" if seed.newer else
               " under a new version number"))
        log.warning("%s", why)
        return [ModelNotice("seed-differs", "start", why, source=source)]

    def init_retrieval_index(self) -> None:
        """The retrieval index, unless retrieval is off or its files do not fit the model."""
        if not self.settings.retrieval.enabled:
            return
        try:
            self.index = TileIndex(self.settings.paths.state, self.settings.retrieval,
                                   self.host.bundle.manifest.embedding_dim)
        except IndexStateError as exc:  # e.g. a model with another embedding size
            log.error("retrieval disabled: %s", exc)
            return
        self.host.bind_index(self.index.dim)
        host = self.host
        self.retrieval = RetrievalService(self.index, self.settings.retrieval,
                                          lambda: host.runtime, self.settings.node_id,
                                          self.settings.input,
                                          results_dir=self.settings.paths.results)

    def init_drift_monitor(self) -> None:
        s = self.settings
        if s.drift.enabled:
            bundle = self.host.bundle
            self.drift = DriftMonitor(bundle.reference, s.drift, s.paths.state,
                                      bundle.expert_references())
            self._drifting = self.drift.status().drifting

    def init_adaptation(self) -> None:
        s = self.settings
        if s.adapt.enabled:
            adapter = Adapter(self.host.store, s.adapt, s.paths.state, s.tiling)
            self.jobs = AdaptationJobs(adapter, self.host, s.adapt.keep_versions,
                                       self._publish_refusal)

    def init_telemetry(self) -> None:
        jobs = self.jobs
        self.telemetry = Telemetry(self.settings.node_id, self.notifier, self.host, self.inbox,
                                   self.journal, self.drift,
                                   lambda: jobs is not None and jobs.running,
                                   state_dir=self.settings.paths.state,
                                   experts=self._experts)
        self.telemetry.watch_disks(self.disk.check)

    def init_comms(self) -> None:
        mqtt = self.settings.mqtt
        self.topics = Topics(mqtt.topic_prefix, self.settings.node_id)
        if mqtt.enabled:
            self.comms = Comms(mqtt, self.settings.node_id, self.journal,
                               self.telemetry.status_json)
            self.telemetry.on_change(self.comms.publish_status)
            self.telemetry.watch_mqtt(self.comms.connection)
            self.comms.on_connection_change(self.telemetry.refresh)

    def init_scene_lifecycle(self) -> None:
        s = self.settings
        self.lifecycle = SceneLifecycle(
            self.journal, self.inbox, s.paths, s.input, self.topics, s.node_id,
            process=self._process_scene, after=self._after_scene, observer=self.telemetry,
            kick=self.comms.kick if self.comms is not None else lambda: None)

    def init_work_queue(self) -> None:
        """The fleet's shared work queue (``fleet``): scene jobs by reference, each
        committed to the journal before the broker gets its acknowledgement."""
        s = self.settings
        if not s.fleet.enabled:
            return
        if self.comms is None:
            log.warning("fleet.enabled is set but mqtt.enabled is not: no jobs are taken")
            return
        comms = self.comms
        self.work_queue = WorkQueue(self.journal, self.lifecycle, s.fleet, s.input, self.topics,
                                    self.submit, comms.ack, comms.publish_now, comms.kick,
                                    lambda: self.loop.stopping)
        fleet = FleetTopics(s.mqtt.topic_prefix)
        comms.take_jobs(fleet.shared_jobs(s.fleet.group), fleet.jobs, self.work_queue.offer,
                        s.fleet.max_inflight, s.fleet.session_expiry)

    def wire_model_switches(self) -> None:
        """What follows a model switch, in order: drift judges against the new model, the
        event goes out, the status shows it."""
        if self.drift is not None:
            self.host.on_switch(lambda change: self._drift_switch(change))
        self.host.on_switch(self._publish_switch)
        self.host.on_switch(lambda _change: self.telemetry.set_state(self.telemetry.state,
                                                                     force=True))

    def init_model_commands(self) -> None:
        """Reload, rollback, activate and install, for MQTT and the dashboard alike."""
        self.model_commands = ModelCommands(self.host, self.submit, self._announce,
                                            Installer(self.host, self.settings.model))

    def register_commands(self) -> None:
        """``<p>/cmd/<verb>``: each handler only queues its work for the main loop."""
        model = self.model_commands
        if self.comms is None or model is None:
            return
        for verb, command in (("reload", model.reload), ("rollback", model.rollback),
                              ("activate", model.activate), ("install", model.install)):
            self.comms.on_command(verb, command)
        self.comms.on_command("rescan", lambda _payload: self.submit(self.inbox.rescan))
        self.comms.on_command("adapt", lambda _payload: self.submit(
            lambda: self._start_adaptation("command")))

    def register_requests(self) -> None:
        """``<p>/retrieval/query``, answered on the comms request thread (``busy`` beyond
        ``mqtt.max_pending_requests``)."""
        if self.comms is None or self.retrieval is None:
            return
        service = self.retrieval
        self.comms.on_request(RETRIEVAL_QUERY, service.handle_request,
                              refusal=service.refusal_reply)

    def init_http(self) -> None:
        """The dashboard, ``/metrics`` and the health probes (``http``)."""
        if not self.settings.http.enabled:
            return
        comms = self.comms
        try:
            assert self.model_commands is not None
            self.http = node_server(self.settings, self.telemetry, self.journal, self.host,
                                    self.index, self.retrieval, self.model_commands,
                                    (lambda: comms.connected.is_set()) if comms else None)
        except (OSError, ValueError) as exc:
            raise StartError(str(exc)) from exc

    def start_comms(self) -> None:
        if self.comms is not None:
            self.comms.start()

    # -- one scene's steps ------------------------------------------------------------------

    def _process_scene(self, source: SceneSource, scene_id: str, out_dir: Path
                       ) -> SceneOutcome:
        s = self.settings
        return process_scene(source, scene_id, out_dir, self.host.runtime, s,
                             probe_sharpness=s.adapt.enabled,
                             embedding_scale=s.retrieval.scale,
                             should_stop=lambda: self.loop.stopping)

    def _after_scene(self, outcome: SceneOutcome) -> DriftReport | None:
        """Index the cells, keep adaptation candidates, score drift; publish a drift change
        and start a job when one is due."""
        if self.http is not None:
            self.http.metrics.scene_processed(outcome)
        if self.index is not None:
            self.index.add_scene(outcome, self.host.bundle.manifest.class_names)
        if self.jobs is not None:
            self.jobs.collect(outcome.cells)
        if self.drift is None:
            return None
        report = self.drift.observe(outcome.cells)
        if report.drifting != self._drifting and self.comms is not None:
            event = DriftEvent(node_id=self.settings.node_id, scene_id=outcome.scene_id,
                               report=report)
            self.comms.send(DRIFT_EVENTS, event.to_json(), event.msg_id)
        self._drifting = report.drifting
        if self.jobs is not None and self.jobs.due(report.drifting):
            self._start_adaptation("drift")
        return report

    # -- the model ----------------------------------------------------------------------------

    def _start_adaptation(self, reason: str) -> None:
        if self.jobs is None:
            log.info("adaptation (%s) not started: adaptation is disabled", reason)
            return
        self.jobs.start(reason, self.submit)

    def _drift_switch(self, change: Switch) -> None:
        assert self.drift is not None
        self.drift.switch_model(change.bundle)

    def _experts(self) -> list[ExpertUse]:
        """The running model's paths and the scenes each served (empty: adaptation off)."""
        return [] if self.jobs is None else self.jobs.adapter.usage.summary(self.host.bundle)

    def _publish_switch(self, change: Switch) -> None:
        self._publish_model_event(ModelEvent(
            node_id=self.settings.node_id, action=change.action,
            model=ModelRef.of(self.host.bundle.manifest),
            previous=ModelRef.of(change.previous.manifest), detail=change.detail,
            reason=change.reason, source=change.source,
            request="start" if change.action == "fallback" else None,
            experts=self._experts()))

    def _publish_refusal(self, report: AdaptationReport) -> None:
        """A job's proposal that was refused (by its gate, or when it came to run)."""
        self._publish_model_event(ModelEvent(
            node_id=self.settings.node_id, action="rejected",
            model=ModelRef.of(self.host.bundle.manifest), detail=report,
            experts=self._experts()))

    def _announce(self, news: Switch | ModelNotice) -> None:
        """A model switch or notice on ``events/model``."""
        if isinstance(news, Switch):
            self._publish_switch(news)
            return
        self._publish_model_event(ModelEvent(
            node_id=self.settings.node_id, action=news.action,
            model=ModelRef.of(self.host.bundle.manifest),
            target=ModelRef.of(news.target) if news.target is not None else None,
            request=news.request, reason=news.reason, source=news.source))

    def _publish_model_event(self, event: ModelEvent) -> None:
        if self.comms is not None:
            self.comms.send(MODEL_EVENTS, event.to_json(), event.msg_id)

    # -- running ------------------------------------------------------------------------------

    def submit(self, task: Callable[[], None]) -> None:
        """Run ``task`` on the main loop between scenes (thread-safe)."""
        self.loop.submit(task)

    def run(self) -> int:
        """Start, run the main loop until SIGTERM, stop. Returns the exit code."""
        signal.signal(signal.SIGTERM, self.loop.request_stop)
        signal.signal(signal.SIGINT, self.loop.request_stop)
        signal.signal(signal.SIGHUP, lambda _signum, _frame: self.submit(self.reload))
        keeper = self.loop.keep_watchdog(lambda: self.telemetry.busy_since)
        try:
            self.start()
            s = self.settings
            self.loop.run(handle=self.lifecycle.handle_guarded, idle=self.telemetry.idle,
                          periodic=[
                              Periodic("retrying files left in work/", self.inbox.rescan_every,
                                       self.lifecycle.retry_stuck, first=self.inbox.rescan_every),
                              # between scenes, so a sweep never races a scene's own files
                              Periodic("retention sweep", s.retention.sweep_seconds,
                                       self.sweeper.sweep),
                              Periodic("stats", s.mqtt.stats_interval, self._publish_stats)])
        finally:
            self.stop()
            if keeper is not None:
                keeper.set()
        return 0

    def reload(self) -> None:
        """SIGHUP (``systemctl reload``): re-read the config file and the model.

        A config that does not validate is refused whole (logged with every bad key; the
        node keeps running as it was). Of a valid one, the log level and format, retention
        and ``paths.min_free_mb`` take effect now; any other changed section is named in a
        WARNING and takes effect at the next restart. Then the store's active pointer is
        followed (as ``cmd/reload``) and ``model.bundle`` compared with what is installed.
        """
        self.notifier.notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            self._reload_config()
            try:
                self.host.reload()
            except BundleError as exc:
                log.error("reload: the model stays v%d: %s", self.host.bundle.version, exc)
                self._announce(ModelNotice("refused", "reload", str(exc)))
            for news in self.adopt_seed():
                if isinstance(news, ModelNotice):  # a switch is announced by the listeners
                    self._announce(news)
        finally:
            self.notifier.ready(self.telemetry.status_line())

    def _reload_config(self) -> None:
        if self.config_path is None:
            log.warning("reload: no config file to re-read (started without one)")
            return
        try:
            new = load_settings(self.config_path)
        except ConfigError as exc:
            log.error("reload: %s is not valid; keeping the running configuration:\n%s",
                      self.config_path, exc)
            return
        old = self.settings
        later = sorted(name for name in Settings.model_fields
                       if name not in LIVE_SECTIONS and name != "paths"
                       and getattr(new, name) != getattr(old, name))
        if new.paths.model_copy(update={"min_free_mb": old.paths.min_free_mb}) != old.paths:
            later.append("paths")
        self.settings = old.model_copy(update={
            "log_level": new.log_level, "logging": new.logging, "retention": new.retention,
            "paths": old.paths.model_copy(update={"min_free_mb": new.paths.min_free_mb})})
        setup_logging(self.settings)
        self.sweeper.cfg = new.retention
        self.disk.min_free_mb = new.paths.min_free_mb
        log.info("reload: %s re-read", self.config_path)
        if later:
            log.warning("reload: %s changed; that takes effect after a restart "
                        "(systemctl restart terratile)", ", ".join(later))

    def _publish_stats(self) -> None:
        if self.comms is not None:
            self.comms.publish_stats(self.telemetry.stats().to_json())


def run_daemon(settings: Settings, config_path: Path | None = None) -> int:
    """``terratile run``: build the node and run it until SIGTERM.

    A node that cannot start (no usable model, unreadable bundle, another daemon on the
    same state) exits with ``EX_CONFIG`` so the unit's ``RestartPreventExitStatus`` stops a
    pointless restart loop.
    """
    os.umask(UMASK)  # journal, index, models and results are not world-readable
    app = App(settings, config_path=config_path)
    try:
        app.build()
    except (StartError, BundleError, FileNotFoundError) as exc:
        log.error("cannot start: %s", exc)
        return EX_CONFIG
    code = app.run()
    if app.job_left_running:
        # Everything durable is closed; a thread still inside onnxruntime would make the
        # interpreter's exit abort the process, so leave without running C++ destructors.
        logging.shutdown()
        os._exit(code)
    return code
