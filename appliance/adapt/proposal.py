"""A step's outcome as a candidate bundle: sealed by the model store, never installed here.

A step that gets as far as its gate returns a ``Proposal``: its report and the files that
make the new version (a new head, or a new expert's head, backbone and reference). Passed
or not, it becomes a sealed candidate bundle through ``ModelStore.derive``. A passing one
is handed to the caller (``AdaptationReport.candidate``), who installs and activates it.
A refused one is kept for inspection under ``state/adapt/rejected/`` with its
``report.json``, the newest ``adapt.keep_rejected`` of them: a box that stays off its
source domain refuses a job every few scenes, and each keeps a bundle copy.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from appliance.contract.bundle import Bundle, Expert
from appliance.contract.payloads import AdaptationReport
from appliance.model.store import ModelStore


@dataclass(frozen=True)
class Proposal:
    """A gated change to a bundle, not yet written: the report (``promoted`` or
    ``rejected``), bundle file name → file to copy in, and the new expert list (None:
    the bundle's own)."""

    report: AdaptationReport
    files: dict[str, Path] = field(default_factory=dict)
    experts: list[Expert] | None = None


class CandidateBundles:
    """Writes proposals as candidate bundles; keeps the refused ones."""

    def __init__(self, models: ModelStore, rejected_dir: Path, keep: int) -> None:
        self.models = models
        self.rejected_dir = Path(rejected_dir)
        self.keep = keep

    def settle(self, bundle: Bundle, proposal: Proposal) -> AdaptationReport:
        """The candidate made from ``bundle``: its path in the report when promoted, else
        kept under ``rejected/`` (``kept_at``)."""
        report = proposal.report
        metrics = dict(bundle.manifest.metrics)
        metrics["adaptation"] = report.model_dump(mode="json",
                                                  include={"reason", "step", "counts", "gate"})
        update: dict[str, object] = {
            "metrics": metrics,
            "notes": f"adapted ({report.step}) from v{bundle.version}: {report.reason}"}
        if proposal.experts is not None:
            update["experts"] = proposal.experts
        candidate = self.models.derive(bundle, proposal.files, update)
        if report.promoted:
            return report.model_copy(update={"candidate": str(candidate)})
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%f")
        kept = self.rejected_dir / f"{stamp}-{report.step}-from-v{bundle.version:04d}"
        shutil.move(str(candidate), kept)
        (kept / "report.json").write_text(json.dumps(report.as_dict(), indent=2))
        self._prune()
        return report.model_copy(update={"kept_at": str(kept)})

    def _prune(self) -> None:
        """Keep the newest ``keep`` refused candidates."""
        kept = sorted(p for p in self.rejected_dir.iterdir() if p.is_dir())
        for old in kept[: max(len(kept) - self.keep, 0)]:
            shutil.rmtree(old, ignore_errors=True)
