"""Label-free drift detection against the bundle's ``reference.json``.

A scene routed to an adapted expert is scored against that expert's own reference (its
domain as adapted to, ``Expert.reference``), every other scene against the source's.

Three signals, each computed per scene and judged over a sliding window of scenes:

- ``radiometry``: population stability index (PSI) of each band's rescaled pixels on the
  reference deciles (ten bins of 10 % source mass each); the scene score is the worst band.
- ``features``: squared maximum mean discrepancy (unbiased MMD², RBF kernel with the
  median-distance bandwidth of the reference sample) between the scene's backbone features
  and the reference feature sample, both projected on the reference PCA axes.
- ``confidence``: two Page-Hinkley detectors on the stream of per-scene mean max-probability
  (a drop) and mean normalised entropy (a rise), both measured from the reference values with
  a tolerance ``drift.confidence_delta``; they fire when the cumulative excess passes
  ``drift.confidence_threshold``, so one odd scene cannot fire them.

Radiometry and features fire on the *median* of the last ``drift.window`` per-scene scores
(so a single odd scene cannot fire them either) once ``drift.min_scenes`` scenes were seen.
The stream is ``drifting`` when at least ``drift.min_signals`` signals fire together.
Window and detector state live in ``state_dir/drift.json`` and survive restarts.

On every model switch the caller hands the new bundle to ``switch_model``: another source
reference (a different model) starts everything over; the same one (an adapted version,
a rollback) only restarts the confidence detectors, since the heads changed but the
imagery the window describes did not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from appliance.config import DriftConfig
from appliance.contract.bundle import Bundle, Reference
from appliance.contract.durable import atomic_write_text
from appliance.contract.payloads import (
    DriftReport,
    DriftScores,
    DriftStatus,
    DriftThresholds,
    DriftWindow,
    Signal,
)
from appliance.contract.reference_stats import entropy
from appliance.scene.cells import SceneCells

STATE_FILE = "drift.json"
_MMD_ROWS = 256
_EPS = 1e-4


@dataclass
class PageHinkley:
    """One-sided Page-Hinkley test on a stream of excesses ``x`` (positive = worse).

    ``m`` accumulates ``x - delta``; the detector fires when ``m`` rose more than
    ``threshold`` above its running minimum.
    """

    delta: float
    threshold: float
    cumulative: float = 0.0
    minimum: float = 0.0
    n: int = 0

    def update(self, x: float) -> float:
        self.n += 1
        self.cumulative += x - self.delta
        self.minimum = min(self.minimum, self.cumulative)
        return self.statistic

    @property
    def statistic(self) -> float:
        return self.cumulative - self.minimum

    @property
    def fired(self) -> bool:
        return self.statistic > self.threshold

    def state(self) -> dict[str, float]:
        return {"cumulative": self.cumulative, "minimum": self.minimum, "n": self.n}


def psi(expected_edges: np.ndarray, values: np.ndarray) -> float:
    """PSI of ``values`` on bins whose inner edges are reference quantiles of equal mass."""
    n_bins = len(expected_edges) + 1
    counts = np.bincount(np.searchsorted(expected_edges, values, side="right"),
                         minlength=n_bins).astype(np.float64)
    actual = np.maximum(counts / max(len(values), 1), _EPS)
    expected = np.full(n_bins, 1.0 / n_bins)
    return float(((actual - expected) * np.log(actual / expected)).sum())


def mmd2(x: np.ndarray, y: np.ndarray, bandwidth: float) -> float:
    """Unbiased squared MMD between rows of ``x`` and ``y`` with an RBF kernel."""
    def kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        d2 = (a**2).sum(1)[:, None] - 2 * a @ b.T + (b**2).sum(1)[None, :]
        return np.exp(-np.maximum(d2, 0.0) / (2 * bandwidth**2))

    m, n = len(x), len(y)
    if m < 2 or n < 2:
        return 0.0
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    xx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    yy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(xx + yy - 2 * kxy.mean())


@dataclass(frozen=True)
class _Baseline:
    """What a scene is scored against, precomputed from one reference."""

    edges: list[np.ndarray]  # per band: the reference deciles
    centre: np.ndarray  # the reference features' mean, centre of the PCA axes
    pca: np.ndarray
    sample: np.ndarray  # reference features on the PCA axes
    bandwidth: float  # RBF bandwidth: median pairwise distance of the sample
    max_prob: float
    entropy: float

    @classmethod
    def of(cls, reference: Reference) -> _Baseline:
        feats = reference.features
        sample = np.asarray(feats.sample, np.float64)
        sq = (sample**2).sum(1)
        d = np.sqrt(np.maximum(sq[:, None] - 2 * sample @ sample.T + sq[None, :], 0.0))
        bandwidth = float(np.median(d[np.triu_indices_from(d, k=1)])) if len(d) > 1 else 1.0
        return cls([np.asarray(b.quantiles[10:100:10], np.float64) for b in reference.bands],
                   np.asarray(feats.mean, np.float64),
                   np.asarray(feats.pca_components, np.float64), sample, bandwidth or 1.0,
                   reference.confidence.mean_max_prob, reference.confidence.mean_entropy)


class DriftMonitor:
    """Streaming drift detector for one node; ``observe`` each processed scene."""

    def __init__(self, reference: Reference, cfg: DriftConfig, state_dir: Path,
                 experts: dict[str, Reference] | None = None) -> None:
        self.cfg = cfg
        self.state_path = Path(state_dir) / STATE_FILE
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        self._reference = reference
        self._source = _Baseline.of(reference)
        self._experts = {name: _Baseline.of(ref) for name, ref in (experts or {}).items()}
        self._history: list[dict[str, Any]] = []
        self._ph_prob = self._new_ph()
        self._ph_entropy = self._new_ph()
        self._load()

    def _new_ph(self) -> PageHinkley:
        return PageHinkley(self.cfg.confidence_delta, self.cfg.confidence_threshold)

    # -- persistence ---------------------------------------------------------------------

    def _load(self) -> None:
        try:
            data = json.loads(self.state_path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return
        self._history = list(data.get("history", []))[-self.cfg.window:]
        for ph, key in ((self._ph_prob, "ph_max_prob"), (self._ph_entropy, "ph_entropy")):
            saved = data.get(key, {})
            ph.cumulative = float(saved.get("cumulative", 0.0))
            ph.minimum = float(saved.get("minimum", 0.0))
            ph.n = int(saved.get("n", 0))

    def _save(self) -> None:
        data = {"history": self._history, "ph_max_prob": self._ph_prob.state(),
                "ph_entropy": self._ph_entropy.state()}
        atomic_write_text(self.state_path, json.dumps(data))

    def switch_model(self, bundle: Bundle) -> None:
        """Judge the stream against the model that now runs, ``bundle``.

        Scenes routed to an adapted expert are scored against that expert's own reference
        (its domain as it was adapted to), so after adaptation drift clears instead of
        firing for ever. A different source reference (another model) forgets the window
        and every detector; the same one restarts only the confidence detectors (the
        heads changed, the imagery did not).
        """
        reference = bundle.reference
        if reference != self._reference:
            self._reference = reference
            self._source = _Baseline.of(reference)
            self._history = []
        self._experts = {name: _Baseline.of(ref)
                         for name, ref in bundle.expert_references().items()}
        self._ph_prob = self._new_ph()
        self._ph_entropy = self._new_ph()
        self._save()

    def _baseline(self, domain: str | None) -> _Baseline:
        return self._experts.get(domain or "", self._source)

    # -- scoring -------------------------------------------------------------------------

    def scene_scores(self, cells: SceneCells) -> DriftScores:
        """Per-scene scores; raises ``ValueError`` when the scene has no valid data."""
        valid = cells.valid
        if not valid.any() or len(cells.band_sample) == 0 or len(cells.sample_features) == 0:
            raise ValueError("no valid cells")
        base = self._baseline(cells.domain)
        pixels = cells.band_sample.astype(np.float64)
        band_psi = [psi(edges, pixels[:, i]) for i, edges in enumerate(base.edges)]
        feats = cells.sample_features.reshape(-1, cells.sample_features.shape[-1])
        if len(feats) > _MMD_ROWS:
            rows = np.random.default_rng(0).choice(len(feats), _MMD_ROWS, replace=False)
            feats = feats[rows]
        projected = (feats.astype(np.float64) - base.centre) @ base.pca.T
        probs = cells.probs[valid]
        return DriftScores(
            reference=cells.domain if cells.domain in self._experts else None,
            psi_bands=[round(v, 5) for v in band_psi], psi=max(band_psi),
            mmd=mmd2(projected, base.sample, base.bandwidth),
            mean_max_prob=float(probs.max(axis=1).mean()),
            mean_entropy=float(entropy(probs).mean()), cells=int(valid.sum()))

    def observe(self, cells: SceneCells) -> DriftReport:
        """Score one scene, update the window and detectors, persist, and judge."""
        try:
            scene = self.scene_scores(cells)
        except ValueError as exc:
            return self._judge(cells.scene_id, None, skipped=str(exc))
        self._history.append({"scene_id": cells.scene_id, "psi": scene.psi, "mmd": scene.mmd})
        self._history = self._history[-self.cfg.window:]
        base = self._baseline(scene.reference)
        self._ph_prob.update(base.max_prob - scene.mean_max_prob)
        self._ph_entropy.update(scene.mean_entropy - base.entropy)
        self._save()
        return self._judge(cells.scene_id, scene)

    def _judge(self, scene_id: str, scene: DriftScores | None, skipped: str | None = None
               ) -> DriftReport:
        cfg = self.cfg
        seen = len(self._history)
        psi_w = float(np.median([h["psi"] for h in self._history])) if seen else 0.0
        mmd_w = float(np.median([h["mmd"] for h in self._history])) if seen else 0.0
        ready = seen >= min(cfg.min_scenes, cfg.window)
        fired: list[Signal] = []
        if ready and psi_w > cfg.psi_threshold:
            fired.append("radiometry")
        if ready and mmd_w > cfg.feature_threshold:
            fired.append("features")
        if self._ph_prob.fired or self._ph_entropy.fired:
            fired.append("confidence")
        window = DriftWindow(psi=psi_w, mmd=mmd_w, scenes=seen,
                             ph_max_prob=self._ph_prob.statistic,
                             ph_entropy=self._ph_entropy.statistic)
        thresholds = DriftThresholds(psi=cfg.psi_threshold, mmd=cfg.feature_threshold,
                                     ph=cfg.confidence_threshold, ph_delta=cfg.confidence_delta)
        return DriftReport(scene_id=scene_id, drifting=len(fired) >= cfg.min_signals,
                           fired=fired, scene=scene, window=window,
                           scenes_seen=self._ph_prob.n, skipped=skipped, thresholds=thresholds)

    def status(self) -> DriftStatus:
        """The current verdict without a new scene (``adapting`` is the caller's to set)."""
        report = self._judge("", None)
        return DriftStatus(drifting=report.drifting, fired=report.fired, window=report.window)
