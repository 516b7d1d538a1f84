"""Self-adaptation: gated proposals of a better model for the scenes the box now sees.

``Adapter`` wires the parts and runs one job at a time (``run``, on the caller's thread):

- ``collector``: per scene, the cells it may learn from go to the candidate store;
- ``usage``: per scene, which expert served it; idle experts are retired by the next job;
- ``schedule``: whether an automatic job is due (drift, a head step owed, cooldown, an
  idle expert);
- ``expert_step``: each new sensor gets its own routed expert (calibrated input,
  re-normalised backbone, the source head), or replaces the expert of a domain that
  moved on;
- ``head_step``: retrieval-confirmed pseudo-labels train a new head for the adapted
  expert (or the source model's own), unless the reset policy sends the lineage back;
- ``bundles``: a gated step becomes a sealed candidate bundle (``ModelStore.derive``).

A multi-label (sigmoid) bundle is refused with the reason in the report: every step
here fits and gates softmax heads (arg-max pseudo-labels, one class per cell, a
cross-entropy head, a gate on arg-max agreement), which on a sigmoid head would promote a
model that can no longer report several labels per cell (``MULTI_LABEL_REFUSAL``).

The adapter only proposes. It never installs, activates or prunes a version and never
reads which version is active: the caller hands it the active bundle and applies the
report (``AdaptationReport.candidate`` to install, ``reset_to`` to activate).
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path

from appliance.adapt.candidates import CandidateStore
from appliance.adapt.collector import CandidateCollector
from appliance.adapt.expert_step import ExpertStep
from appliance.adapt.head_step import AdaptationError, HeadStep
from appliance.adapt.lineage import Lineage
from appliance.adapt.proposal import CandidateBundles, Proposal
from appliance.adapt.schedule import JobSchedule
from appliance.adapt.usage import ExpertUsage
from appliance.config import AdaptConfig, TilingConfig
from appliance.contract.bundle import Bundle
from appliance.contract.payloads import AdaptationReport
from appliance.model.store import ModelStore
from appliance.scene.cells import SceneCells

log = logging.getLogger(__name__)

ADAPT_DIR = "adapt"
USAGE_FILE = "usage.json"  # per expert: scenes served (appliance.adapt.usage)
MULTI_LABEL_REFUSAL = (
    "refused: multi-label bundle. Adaptation here fits and gates softmax heads (arg-max "
    "pseudo-labels, cross-entropy, arg-max agreement); on a sigmoid head that would promote a "
    "model that reports one label per cell. No step was run; the model is unchanged.")


class Adapter:
    """Collects target cells and runs gated adaptation jobs that propose new versions."""

    def __init__(self, models: ModelStore, cfg: AdaptConfig, state_dir: Path,
                 tiling: TilingConfig) -> None:
        self.models = models
        self.cfg = cfg
        self.root = Path(state_dir) / ADAPT_DIR
        self.candidates = CandidateStore(self.root / "candidates", cfg.store_max_cells,
                                         cfg.store_max_tiles)
        self.collector = CandidateCollector(self.candidates, cfg)
        self.schedule = JobSchedule(self.root / "last_job.json", cfg)
        self.usage = ExpertUsage(self.root / USAGE_FILE, cfg.expert_idle_scenes)
        self.expert_step = ExpertStep(cfg, self.candidates)
        self.head_step = HeadStep(cfg, tiling, self.candidates)
        self.bundles = CandidateBundles(models, self.root / "rejected", cfg.keep_rejected)
        self._job_lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._job_lock.locked()

    def collect(self, cells: SceneCells, bundle: Bundle) -> int:
        """Count the scene for the expert that served it and store its usable cells
        (``bundle``: the one that classified it)."""
        self.usage.record(bundle, cells.domain)
        return self.collector.collect(cells, bundle)

    def due(self, drifting: bool, bundle: Bundle) -> bool:
        """Whether an automatic job on the active ``bundle`` should start now."""
        if self.running:
            return False
        if self.cfg.enabled and self.cfg.auto and self.usage.idle(bundle):
            return True  # retiring needs no new cells
        if not self.schedule.wanted(drifting):
            return False
        if max(self.candidates.count(k) for k in self._job_keys(drifting, bundle)) \
                < self.cfg.min_samples:
            return False
        return self.schedule.cooled_down(self.candidates.last_seq)

    def _job_keys(self, drifting: bool, bundle: Bundle) -> set[str]:
        """Input keys whose cells can feed the next job: the adapted expert's, and on drift
        the source model's too, because a domain no expert claims routes to the source, so
        a second sensor's cells are stored there and not under the newest expert's key."""
        keys = {self.collector.adapted_key(bundle)}
        if drifting:
            keys.add(self.collector.key(bundle, None))
        return keys

    def run(self, bundle: Bundle, reason: str) -> AdaptationReport:
        """One gated job on the active ``bundle``; never raises for expected outcomes (the
        report says what happened and what to install or activate)."""
        if not self._job_lock.acquire(blocking=False):
            return AdaptationReport(reason=reason, action="skipped", version_before=bundle.version,
                                    message="another adaptation job is running")
        started = time.monotonic()
        try:
            report = self._job(bundle, reason, started + self.cfg.max_seconds)
        except AdaptationError as exc:
            report = AdaptationReport(reason=reason, action="skipped",
                                      version_before=bundle.version, message=str(exc))
        finally:
            self._job_lock.release()
        self.schedule.mark(report, self.candidates.last_seq)
        report = report.model_copy(update={"seconds": round(time.monotonic() - started, 3)})
        log.info("adaptation (%s): %s %s", reason, report.action, report.message)
        return report

    def _job(self, bundle: Bundle, reason: str, deadline: float) -> AdaptationReport:
        """Idle experts retired if there are any; else a new expert if the stored scenes
        need one, else (or when it is refused) a head step; a refused expert rides along in
        ``refused_input``."""
        if bundle.manifest.task == "multi-label":
            return AdaptationReport(reason=reason, action="skipped",
                                    version_before=bundle.version, message=MULTI_LABEL_REFUSAL)
        idle = self.usage.idle(bundle)
        if idle:
            return self.bundles.settle(bundle, self.retirement(bundle, reason, idle))
        lineage = Lineage.of(self.models, bundle)
        with tempfile.TemporaryDirectory(dir=self.root) as tmp:
            expert = self.expert_step.run(lineage, reason, deadline, Path(tmp),
                                          frozenset(self.usage.names()))
            refused = None if expert is None else self.bundles.settle(bundle, expert)
            if refused is not None and refused.promoted:
                return refused
            head = self.head_step.run(lineage, reason, deadline, Path(tmp))
            report = self.bundles.settle(bundle, head) if isinstance(head, Proposal) else head
        return report.model_copy(update={"refused_input": refused})

    def retirement(self, bundle: Bundle, reason: str, idle: list[str]) -> Proposal:
        """A version of ``bundle`` without the ``idle`` experts: their scenes, should any
        come back, route to the nearest remaining path (the source's or another expert's).
        No gate: the version serves every other scene exactly as before; the retired
        experts stay in the older versions, for rollback."""
        kept = [d for d in bundle.manifest.experts if d.name not in idle]
        usage = {u.name: u.idle_scenes for u in self.usage.summary(bundle)}
        message = ", ".join(f"{name} idle for {usage[name]} scenes" for name in idle)
        return Proposal(AdaptationReport(reason=reason, action="promoted", step="retire",
                                         version_before=bundle.version, retired=idle,
                                         message=f"retired: {message}"),
                        experts=kept)
