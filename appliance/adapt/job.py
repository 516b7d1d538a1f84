"""Adaptation jobs on a running model: the adapter proposes, the model host decides.

A job runs the ``Adapter`` against the bundle that runs now. Its report proposes a change
(a sealed candidate bundle, or a reset to the source version) and never touches the
store's active pointer. The job then has the model host install the candidate beside the
other versions and open (warm) its sessions, off the main loop. Only then, on the main
loop, the host switches to it; a proposal made for a model that no longer runs (a
rollback came in meanwhile) is refused. The daemon and ``terratile models adapt`` run the
same steps; the CLI simply runs them on its own thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from appliance.adapt.adapter import Adapter
from appliance.contract.bundle import BundleError
from appliance.contract.payloads import AdaptationReport
from appliance.model.host import ModelHost, Staged
from appliance.scene.cells import SceneCells

log = logging.getLogger(__name__)

Submit = Callable[[Callable[[], None]], None]
"""Runs a callable on the daemon's main loop."""


def stage(host: ModelHost, report: AdaptationReport) -> tuple[Staged | None, AdaptationReport]:
    """Install a job's promoted candidate (not activated) or load its reset version, and
    open its sessions: the slow part, off the main loop. A proposal that cannot run comes
    back rejected, with why."""
    candidate = Path(report.candidate) if report.candidate else None
    try:
        if report.action == "promoted" and candidate is not None:
            return host.stage(host.install(candidate)), report
        if report.action == "reset" and report.reset_to is not None:
            return host.stage(report.reset_to), report
    except BundleError as exc:
        log.error("adaptation: the proposed model cannot run: %s", exc)
        return None, report.model_copy(update={
            "action": "rejected", "message": f"the proposed model cannot run: {exc}"})
    finally:
        if candidate is not None:
            host.store.discard(candidate)
    return None, report


def switch(host: ModelHost, report: AdaptationReport, staged: Staged | None,
           keep_versions: int) -> AdaptationReport:
    """Switch to a staged proposal made for the model that still runs (the main loop);
    after a promotion, prune old versions. Returns the job's final report."""
    if staged is not None and host.bundle.version != report.version_before:
        return report.model_copy(update={
            "action": "rejected",
            "message": f"the model changed while adapting (v{report.version_before} → "
                       f"v{host.bundle.version}); the proposal is dropped"})
    if staged is None:
        return report
    report = report.model_copy(update={"version_after": staged.bundle.version,
                                       "bundle_path": str(staged.bundle.path)})
    host.switch(staged, "adapted" if report.promoted else "reset", report)
    if report.promoted:
        pruned = host.store.prune(keep_versions)
        if pruned:
            log.info("pruned model versions %s", pruned)
    return report


class AdaptationJobs:
    """Collects candidates for, schedules and applies adaptation jobs of one model host."""

    def __init__(self, adapter: Adapter, host: ModelHost, keep_versions: int,
                 on_report: Callable[[AdaptationReport], None]) -> None:
        self.adapter = adapter
        self.host = host
        self.keep_versions = keep_versions
        self._on_report = on_report  # a job whose proposal was refused
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    @property
    def running(self) -> bool:
        return self.adapter.running

    def collect(self, cells: SceneCells) -> int:
        """Keep a processed scene's cells as candidates for the running model."""
        return self.adapter.collect(cells, self.host.bundle)

    def due(self, drifting: bool) -> bool:
        return self.adapter.due(drifting, self.host.bundle)

    def start(self, reason: str, submit: Submit) -> None:
        """Run a job on a background thread; its switch is applied through ``submit``."""
        if self.running:
            log.info("adaptation (%s) not started: a job is running", reason)
            return
        bundle = self.host.bundle

        def job() -> None:
            report = self.adapter.run(bundle, reason)
            if self._stopping.is_set():  # no install or warm-up while the daemon stops
                if report.candidate:
                    self.host.store.discard(Path(report.candidate))
                log.info("adaptation (%s): dropped, the daemon is stopping", reason)
                return
            staged, report = stage(self.host, report)

            def finish() -> None:
                self._finish(report, staged)

            submit(finish)

        self._thread = threading.Thread(target=job, name="adaptation", daemon=True)
        self._thread.start()

    def stop(self, timeout: float) -> bool:
        """Let a running job end before the process does (a thread left inside
        onnxruntime when the interpreter exits aborts the process): its proposal is dropped
        rather than installed, and drift proposes it again after the restart. Waits at most
        ``timeout`` seconds; false if the job is still running then."""
        self._stopping.set()
        thread = self._thread
        if thread is None or not thread.is_alive():
            return True
        log.info("stopping: waiting up to %.0f s for the adaptation job", timeout)
        thread.join(timeout)
        if thread.is_alive():
            log.warning("stopping: the adaptation job is still running; leaving it")
            return False
        return True

    def run_here(self, reason: str) -> AdaptationReport:
        """Run a job to the end on this thread (``terratile models adapt``)."""
        staged, report = stage(self.host, self.adapter.run(self.host.bundle, reason))
        return self._finish(report, staged)

    def _finish(self, report: AdaptationReport, staged: Staged | None) -> AdaptationReport:
        done = switch(self.host, report, staged, self.keep_versions)
        if not done.model_changed and done.action != "skipped":
            self._on_report(done)
        log.info("adaptation (%s): %s %s", done.reason, done.action, done.message)
        return done
