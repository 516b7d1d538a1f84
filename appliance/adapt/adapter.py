"""Self-adaptation: retrieval-confirmed pseudo-labels → a new classifier head, gated, versioned.

The GID scheme (Tong et al.), made safe for a box in the field:

1. **Collect** (``collect``, after every scene): the sampled valid cells' per-scale backbone
   features and fused probabilities go to a bounded on-disk ring of ``.npz`` files
   (``state/adapt/candidates/``), oldest dropped first beyond ``adapt.store_max_cells``.
2. **Align**: target features are re-standardised towards the source statistics of
   ``reference.json`` with *blended* target statistics (``adapt.blend``; resetting them fully is
   what makes BN-statistic resets fail). The map is affine per dimension, so the aligned
   source head is still one ``Gemm`` (``LinearHead.composed``) and becomes the teacher.
3. **Pseudo-label** each cell: fused argmax of the teacher, kept when confidence ≥ ``adapt.tau``,
   at most ``adapt.per_class_cap`` cells per class (most confident first).
4. **Confirm** by retrieval: the Euclidean ``adapt.k`` nearest source features
   (``source_bank.npz`` training rows, faiss ``IndexFlatL2``) of the aligned features must
   agree with the pseudo-label for at least ``adapt.agreement`` of them.
5. **Fit** a softmax-regression head on raw features, confirmed target rows plus the source
   training rows, started from the current head and pulled towards the source head (L2,
   ``adapt.l2``); ``adapt.rounds`` rounds, each re-labelling with the teacher and the new head.
   Every ``adapt.holdout_every``-th stored cell is never fitted (neither as a confirmed row nor
   as a distillation row): the gate judges on those.
6. **Gate**: held-back source accuracy may drop at most ``adapt.max_source_drop`` below the
   source head's, predicted-class entropy on target cells stays ≥ ``adapt.min_entropy``, and
   on the held-out cells the update must never get worse and must gain something: agreement
   with their confirmed pseudo-labels must not fall and must rise, unless the current head is
   already at ``adapt.agreement_ceiling``; then agreement with the teacher on all held-out
   cells (where the unconfirmed gains are) must rise instead.
7. **Promote** a passing head as a new bundle version (copy of the active bundle, new head
   file for the adapted expert, ``parent`` recorded, sealed) through ``ModelStore.install``,
   which switches the active pointer atomically; a failing one is kept under
   ``state/adapt/rejected``.

Before any head step, a new sensor (other gains, gamma, haze, blur, coarser sampling) gets
its own *expert* (``_input_step``, ``bundle.Domain``): an input spec calibrated to the new
domain's band statistics, a backbone whose layer statistics are re-normalised towards it
(``appliance/renorm.py``) and a copy of the source head, which head steps then refine.
Scenes are routed per scene to the expert whose signature (band moments and sharpness) is
nearest (``appliance/routing.py``), so source-sensor scenes keep the source model
untouched. A shift no signature can separate is adapted in the source model's own head,
under the source-accuracy gate.

A reset policy guards against slow decay: after ``adapt.reset_after`` successive adapted
versions, or when the current head's predictions on target cells collapse, the job
re-activates the source version instead of adapting further.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import onnx
from scipy.optimize import minimize

from appliance.adapt.candidates import Candidates, CandidateStore, expert_key
from appliance.adapt.renorm import renormalise
from appliance.config import AdaptConfig, TilingConfig
from appliance.contract.bundle import (
    BACKBONE,
    CLASSIFIER,
    FEATURES,
    IMAGE_INPUT,
    LAYER_STATS,
    BandStats,
    Bundle,
    Domain,
    InputSpec,
    Reference,
    load_bundle,
    seal_bundle,
)
from appliance.contract.durable import atomic_write_text
from appliance.contract.layer_stats import LayerStats
from appliance.contract.reference_stats import reference_from_tiles
from appliance.contract.signature import (
    Signature,
    radiometric_distance,
    source_signature,
)
from appliance.model.head import LinearHead, read_head, write_head
from appliance.model.routing import nearest
from appliance.model.runtime import ProviderPlan, open_session, probabilities
from appliance.model.store import ModelStore
from appliance.scene.cells import SceneCells
from appliance.scene.fusion import fuse

log = logging.getLogger(__name__)

ADAPT_DIR = "adapt"
DOMAIN = "adapted"  # the one expert an adaptation lineage grows (see ``_input_step``)
MIN_RENORM_TILES = 8  # fewer target tiles than this give channel statistics too noisy to use
CPU_ONLY = ProviderPlan(providers=("cpu",))  # a job's checks: off the GPU the daemon infers on


class AdaptationError(RuntimeError):
    """An adaptation job that cannot run (no candidates, an unadaptable head...)."""


# -- the learning steps ------------------------------------------------------------------


@dataclass(frozen=True)
class Alignment:
    """Per-dimension affine map ``f * scale + shift`` taking target features to source stats."""

    scale: np.ndarray
    shift: np.ndarray

    @classmethod
    def blended(cls, source_mean: np.ndarray, source_std: np.ndarray, target: np.ndarray,
                blend: float) -> Alignment:
        """Standardise with ``blend``-weighted target statistics, de-standardise with source."""
        t_mean, t_std = target.mean(axis=0), target.std(axis=0)
        mean = (1 - blend) * source_mean + blend * t_mean
        var = (1 - blend) * source_std**2 + blend * t_std**2
        scale = source_std / np.sqrt(np.maximum(var, 1e-12))
        scale = np.where(source_std > 1e-8, scale, 1.0)
        return cls(scale.astype(np.float32), (source_mean - mean * scale).astype(np.float32))

    def apply(self, features: np.ndarray) -> np.ndarray:
        return (features * self.scale + self.shift).astype(np.float32)


@dataclass(frozen=True)
class InputAlignment:
    """Per-band radiometric map ``x ↦ gain·x + offset`` of scene values (model value range).

    It is folded into the bundle's ``InputSpec`` (mean/std), so it costs nothing at run time
    and needs no new backbone: ``(g·x + o)·s − m) / σ = (x·s − (m − s·o)/g) / (σ/g)``.
    """

    gain: np.ndarray
    offset: np.ndarray

    @classmethod
    def blended(cls, ref: list[BandStats], target_mean: np.ndarray, target_std: np.ndarray,
                blend: float) -> InputAlignment:
        """Standardise with blended target band statistics, de-standardise with source."""
        mu_s = np.array([b.mean for b in ref])
        sd_s = np.array([b.std for b in ref])
        mean = (1 - blend) * mu_s + blend * target_mean
        std = np.sqrt((1 - blend) * sd_s**2 + blend * target_std**2)
        gain = sd_s / np.maximum(std, 1e-9)
        return cls(gain, mu_s - gain * mean)

    def spec(self, source: InputSpec) -> InputSpec:
        """``source`` with this map folded into its mean and std."""
        m0, s0 = np.asarray(source.mean), np.asarray(source.std)
        mean = (m0 - source.scale * self.offset) / self.gain
        return source.model_copy(update={"mean": [float(v) for v in mean],
                                         "std": [float(v) for v in s0 / self.gain]})

    def distance(self, ref: list[BandStats], target_mean: np.ndarray,
                 target_std: np.ndarray) -> float:
        """``radiometric_distance`` of the mapped target moments to the source reference's
        (a per-band affine map leaves sharpness as it is, so it is left out)."""
        mean, std, _ = source_signature(ref)
        return radiometric_distance(
            (self.gain * target_mean + self.offset, self.gain * target_std, None),
            (mean, std, None))


def fused_probs(head: LinearHead, features: np.ndarray, tiling: TilingConfig | None = None
                ) -> np.ndarray:
    """Softmax per scale of [n,S,D] features, fused over scales as the pipeline does → [n,K]."""
    n, s, d = features.shape
    probs = probabilities(head.logits(features.reshape(n * s, d)), multi_label=False)
    if tiling is None or len(tiling.scales) != s:
        return fuse(probs.reshape(n, s, -1))
    return fuse(probs.reshape(n, s, -1), tiling.fusion, tiling.weights)


def select_pseudo_labels(probs: np.ndarray, tau: float, cap: int) -> np.ndarray:
    """Indexes of cells whose argmax confidence ≥ tau, at most ``cap`` per class (top first)."""
    labels, conf = probs.argmax(axis=1), probs.max(axis=1)
    keep = []
    for k in np.unique(labels):
        rows = np.flatnonzero((labels == k) & (conf >= tau))
        keep.append(rows[np.argsort(-conf[rows], kind="stable")][:cap])
    return np.sort(np.concatenate(keep)) if keep else np.zeros(0, np.int64)


def retrieval_agreement(index: faiss.Index, bank_labels: np.ndarray, queries: np.ndarray,
                        labels: np.ndarray, k: int) -> np.ndarray:
    """Fraction of each query's k nearest source rows whose label equals the query's label."""
    if len(queries) == 0:
        return np.zeros(0, np.float32)
    _, nn = index.search(np.ascontiguousarray(queries, np.float32), min(k, index.ntotal))
    return (bank_labels[nn] == labels[:, None]).mean(axis=1).astype(np.float32)


def fit_head(features: np.ndarray, targets: np.ndarray, weights: np.ndarray, init: LinearHead,
             anchor: LinearHead, l2: float, deadline: float, max_iter: int = 200
             ) -> LinearHead:
    """Weighted softmax regression by L-BFGS, from ``init``, L2-pulled towards ``anchor``.

    ``targets`` are class indexes [n] or class distributions [n,K] (distillation).
    Minimises ``Σ wᵢ CE(xᵢ, tᵢ) + l2/2 ‖W − W_anchor‖²``; stops at ``deadline``
    (``time.monotonic``) so a job stays within its time budget.
    """
    d, k = init.weight.shape
    x = features.astype(np.float32)
    onehot = (np.eye(k, dtype=np.float32)[targets] if targets.ndim == 1
              else targets.astype(np.float32))
    w_rows = (weights / weights.sum()).astype(np.float32)[:, None]
    w_anchor = anchor.weight.astype(np.float64)

    def loss(params: np.ndarray) -> tuple[float, np.ndarray]:
        w = params[: d * k].reshape(d, k)
        b = params[d * k:]
        logits = x @ w.astype(np.float32) + b.astype(np.float32)
        logits -= logits.max(axis=1, keepdims=True)
        lse = np.log(np.exp(logits).sum(axis=1, keepdims=True))
        logp = logits - lse
        ce = -float((w_rows * onehot * logp).sum())
        err = w_rows * (np.exp(logp) - onehot)
        diff = w - w_anchor
        value = ce + 0.5 * l2 * float((diff**2).sum())
        grad_w = (x.T @ err).astype(np.float64) + l2 * diff
        return value, np.concatenate([grad_w.ravel(), err.sum(axis=0).astype(np.float64)])

    def stop(_: np.ndarray) -> None:
        if time.monotonic() > deadline:
            raise StopIteration

    start = np.concatenate([init.weight.ravel(), init.bias]).astype(np.float64)
    result = minimize(loss, start, jac=True, method="L-BFGS-B", callback=stop,
                      options={"maxiter": max_iter})
    params = result.x
    return LinearHead(params[: d * k].reshape(d, k).astype(np.float32),
                      params[d * k:].astype(np.float32))


def accuracy(head: LinearHead, features: np.ndarray, labels: np.ndarray) -> float:
    if len(labels) == 0:
        return 0.0
    return float((head.logits(features).argmax(axis=1) == labels).mean())


def _agreement(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose argmax equals ``labels`` (0 for no rows)."""
    return float((probs.argmax(axis=1) == labels).mean()) if len(labels) else 0.0


def class_entropy(predicted: np.ndarray, n_classes: int) -> float:
    """Normalised entropy of the predicted-class histogram (1 = uniform, 0 = one class)."""
    if len(predicted) == 0:
        return 0.0
    p = np.bincount(predicted, minlength=n_classes) / len(predicted)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / np.log(max(n_classes, 2)))


def _features(spec: InputSpec, backbone: Path, tiles: np.ndarray) -> np.ndarray:
    """Pooled features [n,D] of value-range ``tiles`` through ``backbone`` on the CPU (a job
    leaves the accelerator to the daemon's inference)."""
    session = open_session(backbone, CPU_ONLY)
    return np.concatenate([
        np.asarray(session.run([FEATURES], {IMAGE_INPUT: spec.normalise(tiles[i:i + 32])})[0])
        for i in range(0, len(tiles), 32)])


def cloud_like(band_means: np.ndarray, value_range: tuple[float, float], brightness: float,
               spread: float) -> np.ndarray:
    """Cells [n] whose every band is at least ``brightness`` of the value range and whose
    bands differ by at most ``spread`` of it: thick cloud, haze banks, saturated snow.

    A radiometric screen for pseudo-labels, not a cloud mask: without SWIR or thermal
    bands a white roof passes too, and thin cirrus does not. A cell it drops is only
    never learnt from; it is still classified.
    """
    lo, hi = value_range
    x = (np.asarray(band_means, np.float64) - lo) / max(hi - lo, 1e-9)
    return np.asarray((x.min(axis=1) >= brightness)
                      & (x.max(axis=1) - x.min(axis=1) <= spread))


def _expert_reference(source: Bundle, spec: InputSpec, tiles: np.ndarray,
                      feats: np.ndarray) -> Reference:
    """``reference.json`` of a new domain as its expert sees it: the stored tiles' pixels,
    the expert's features ``feats`` of them and the source head's probabilities. Drift on
    scenes routed to the expert is judged against this (``DriftMonitor``)."""
    probs = probabilities(read_head(source.file(CLASSIFIER)).logits(feats), multi_label=False)
    return reference_from_tiles(spec.bands, tiles, feats, probs)


def adapted_domain(bundle: Bundle) -> str | None:
    """The expert adaptation refines: the bundle's adapted domain, else its source head."""
    return bundle.manifest.domains[-1].name if bundle.manifest.domains else None


def _domain_scenes(stored: Candidates, source: Signature, rounds: int = 5
                   ) -> tuple[np.ndarray, Signature]:
    """Which stored scenes form the new domain ([m] bool) and their pooled signature:
    two-signature k-means against the ``source`` signature.

    Starting from the pooled signature of all stored scenes, each scene joins the new
    signature when it is nearer to it than to the source reference, and the signature is
    re-pooled from its members, a few times over: recent source-like scenes in the store
    then neither dilute the new domain's signature nor count as its members. Sharpness
    counts only if the source has it too (like with like, as in routing).
    """
    sharp = source[2] is not None
    scenes = stored.scene_signatures(sharp)
    members = np.ones(len(scenes), bool)
    for _ in range(rounds):
        signature = stored.signature(members, sharp)
        joined = np.array([nearest({None: radiometric_distance(scene, source),
                                    DOMAIN: radiometric_distance(scene, signature)})
                           == DOMAIN for scene in scenes])
        if not joined.any() or (joined == members).all():
            return joined, signature
        members = joined
    return members, stored.signature(members, sharp)


# -- the job -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AdaptationData:
    """Everything one job learns from, computed once by ``Adapter.prepare``."""

    bundle: Bundle
    source_bundle: Bundle
    domain: str | None  # the expert being adapted (None: the source model's own head)
    current: LinearHead
    source: LinearHead
    candidates: Candidates
    alignment: Alignment
    teacher: LinearHead  # source head composed with the alignment
    pseudo: np.ndarray  # [n] pseudo-label per candidate cell (teacher argmax)
    confirmed: np.ndarray  # indexes of confirmed cells that may be fitted (round 1)
    heldout: np.ndarray  # [n] bool: cells never fitted, for the gate
    validation: np.ndarray  # indexes of confirmed held-out cells (round 1)
    train_x: np.ndarray  # source training rows
    train_y: np.ndarray
    holdout_x: np.ndarray
    holdout_y: np.ndarray
    index: faiss.Index
    counts: dict[str, int]


@dataclass(frozen=True)
class GateResult:
    passed: bool
    failures: list[str]
    figures: dict[str, float]


@dataclass
class AdaptationReport:
    """What a job did; ``as_dict`` is the ``events/model`` (or rejection) payload body."""

    reason: str
    action: str  # "promoted" | "rejected" | "skipped" | "reset"
    version_before: int | None
    version_after: int | None
    message: str = ""
    step: str = "head"  # "input" (radiometric re-standardisation) | "head"
    domain: str | None = None  # the expert the step changed (None: the source model's head)
    counts: dict[str, int] = field(default_factory=dict)
    gate: dict[str, Any] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    bundle_path: str | None = None
    kept_at: str | None = None
    refused_input: dict[str, Any] | None = None  # an input step refused in the same job

    @property
    def promoted(self) -> bool:
        return self.action == "promoted"

    @property
    def model_changed(self) -> bool:
        """True when the active version changed (promotion or reset)."""
        return self.action in ("promoted", "reset")

    @property
    def classifier_path(self) -> Path | None:
        """The head file the step wrote, in the installed bundle."""
        if self.bundle_path is None:
            return None
        return load_bundle(Path(self.bundle_path)).classifier(self.domain)

    def as_dict(self) -> dict[str, Any]:
        return {
            "reason": self.reason, "action": self.action, "promoted": self.promoted,
            "step": self.step, "domain": self.domain,
            "version_before": self.version_before, "version_after": self.version_after,
            "message": self.message, "counts": self.counts, "gate": self.gate,
            "rounds": self.rounds, "seconds": round(self.seconds, 3),
            "bundle_path": self.bundle_path, "kept_at": self.kept_at,
            "refused_input": self.refused_input,
        }


@dataclass(frozen=True)
class _ActiveExperts:
    """The active bundle as the per-scene collection needs it."""

    version: int | None
    keys: dict[str | None, str]  # input key per expert (None: the source model)
    adapted: str | None  # the expert a job adapts (``adapted_domain``)
    value_range: tuple[float, float]


class Adapter:
    """Collects target cells and runs gated adaptation jobs against a ``ModelStore``."""

    def __init__(self, models: ModelStore, cfg: AdaptConfig, state_dir: Path,
                 tiling: TilingConfig | None = None) -> None:
        self.models = models
        self.cfg = cfg
        self.tiling = tiling
        self.root = Path(state_dir) / ADAPT_DIR
        self.store = CandidateStore(self.root / "candidates", cfg.store_max_cells,
                                    cfg.store_max_tiles)
        self.rejected_dir = self.root / "rejected"
        self._job_lock = threading.Lock()
        self._marker = self.root / "last_job.json"
        self._active: _ActiveExperts | None = None

    def _fused(self, head: LinearHead, features: np.ndarray) -> np.ndarray:
        return fused_probs(head, features, self.tiling)

    # -- collection and scheduling -----------------------------------------------------

    def collect(self, cells: SceneCells) -> int:
        """Keep a scene's sampled valid cells as candidates, never nodata nor cloud-like
        ones (``cloud_like``); returns the count.

        They are stored under the input key of the expert the scene was routed to, so a job
        adapting one expert learns only from features computed the way it computes them.
        """
        if len(cells.sample_index) == 0 or len(cells.band_sample) == 0:
            return 0
        valid = cells.valid[cells.sample_index]
        if cells.band_means is not None:
            valid &= ~cloud_like(cells.band_means[cells.sample_index],
                                 self._experts().value_range, self.cfg.cloud_brightness,
                                 self.cfg.cloud_spread)
        feats = cells.sample_features[valid]
        probs = cells.probs[cells.sample_index][valid]
        return self.store.add(cells.scene_id, feats, probs, cells.band_sample,
                              self.active_key(cells.domain), cells.sample_tiles,
                              cells.sharpness)

    def _experts(self) -> _ActiveExperts:
        """What ``collect`` and ``due`` need of the active bundle, per scene: loaded (and
        its files hashed) only when the active version changed."""
        version = self.models.active_version()
        if self._active is None or self._active.version != version or version is None:
            bundle = self.models.active()
            keys = {name: expert_key(bundle, name)
                    for name in [None, *(d.name for d in bundle.manifest.domains)]}
            self._active = _ActiveExperts(version, keys, adapted_domain(bundle),
                                          bundle.manifest.input.value_range)
        return self._active

    def active_key(self, domain: str | None = None) -> str:
        """Input key of an expert of the active bundle (None: the source model's)."""
        return self._experts().keys.get(domain, "")

    def adapted_key(self) -> str:
        """Input key of the expert the next job adapts."""
        active = self._experts()
        return active.keys[active.adapted]

    @property
    def running(self) -> bool:
        return self._job_lock.locked()

    def due(self, drifting: bool) -> bool:
        """Whether an automatic job should start now: drift (or a head step owed after an
        input re-standardisation), enough cells under the active input, cooled down."""
        last = self._last_job()
        if not (self.cfg.enabled and self.cfg.auto) or self.running:
            return False
        if not (drifting or last.get("follow_up", False)):
            return False
        if self.store.count(self.adapted_key()) < self.cfg.min_samples:
            return False
        return self.store.last_seq - int(last.get("seq", -(10**9))) >= self.cfg.cooldown_scenes

    def _last_job(self) -> dict[str, Any]:
        try:
            data = json.loads(self._marker.read_text())
            return data if isinstance(data, dict) else {}
        except (FileNotFoundError, ValueError, json.JSONDecodeError):
            return {}

    def _mark_job(self, report: AdaptationReport) -> None:
        """Remember when the last job ran and whether a head step is still owed."""
        owed = self._last_job().get("follow_up", False) and report.action == "skipped"
        follow_up = (report.step == "input" and report.promoted) or owed
        atomic_write_text(self._marker, json.dumps({"seq": self.store.last_seq, "ts": time.time(),
                                                    "follow_up": bool(follow_up)}))

    # -- lineage -----------------------------------------------------------------------

    def lineage(self, bundle: Bundle) -> list[int]:
        """Versions from ``bundle`` back to its source (a version without parent)."""
        return self.models.lineage(bundle.version)

    # -- steps -------------------------------------------------------------------------

    def prepare(self) -> AdaptationData:
        """Load candidates and bundles, align, pseudo-label and confirm (round 1)."""
        bundle = self.models.active()
        if bundle.manifest.task != "single-label":
            raise AdaptationError("adaptation supports single-label bundles only")
        source_bundle = load_bundle(self.models.dir_for(self.lineage(bundle)[-1]))
        domain = adapted_domain(bundle)
        current = read_head(bundle.classifier(domain))
        source = read_head(source_bundle.file(CLASSIFIER))
        cands = self.store.load(expert_key(bundle, domain))
        if len(cands) == 0:
            raise AdaptationError(f"no candidate cells collected under the input spec of "
                                  f"{'domain ' + repr(domain) if domain else 'the source model'}")
        if cands.features.shape[-1] != current.dim:
            raise AdaptationError(
                f"stored features have {cands.features.shape[-1]} dims, head expects "
                f"{current.dim}; clear {self.store.root} after changing backbones")
        bank = source_bundle.source_bank
        labels = bank.labels.astype(np.int64)
        train, hold = ~bank.holdout, bank.holdout
        ref = source_bundle.reference.features
        flat = cands.features.reshape(-1, cands.features.shape[-1])
        alignment = Alignment.blended(np.asarray(ref.mean, np.float32),
                                      np.asarray(ref.std, np.float32), flat, self.cfg.blend)
        teacher = source.composed(alignment.scale, alignment.shift)
        index = faiss.IndexFlatL2(bank.features.shape[1])
        index.add(np.ascontiguousarray(bank.features[train]))
        probs = self._fused(teacher, cands.features)
        pseudo = probs.argmax(axis=1)
        confirmed = self._confirm(probs, cands.features, alignment, index, labels[train])
        heldout = np.arange(len(cands)) % self.cfg.holdout_every == 0
        validation = confirmed[heldout[confirmed]]
        confirmed = confirmed[~heldout[confirmed]]
        counts = {"candidates": len(cands), "scenes": len(np.unique(cands.scenes)),
                  "pseudo": int((probs.max(axis=1) >= self.cfg.tau).sum()),
                  "confirmed": len(confirmed), "heldout": int(heldout.sum()),
                  "validation": len(validation), "source_train": int(train.sum()),
                  "source_holdout": int(hold.sum())}
        return AdaptationData(bundle, source_bundle, domain, current, source, cands, alignment,
                              teacher, pseudo, confirmed, heldout, validation, bank.features[train],
                              labels[train], bank.features[hold], labels[hold], index, counts)

    def _confirm(self, probs: np.ndarray, features: np.ndarray, alignment: Alignment,
                 index: faiss.Index, bank_labels: np.ndarray) -> np.ndarray:
        """Pseudo-labelled cells whose aligned features' source neighbours agree."""
        chosen = select_pseudo_labels(probs, self.cfg.tau, self.cfg.per_class_cap)
        if len(chosen) == 0:
            return chosen
        labels = probs.argmax(axis=1)[chosen]
        queries = alignment.apply(features[chosen].mean(axis=1))
        agree = retrieval_agreement(index, bank_labels, queries, labels, self.cfg.k)
        return chosen[agree >= self.cfg.agreement]

    def fit(self, data: AdaptationData, cells: np.ndarray, labels: np.ndarray,
            deadline: float, init: LinearHead | None = None, distill: bool = False
            ) -> LinearHead:
        """A head trained on target ``cells`` (all their scales) with ``labels`` + source rows.

        With ``distill`` every stored target cell outside the gate's held-out part also
        contributes the aligned teacher's class distribution (weight ``adapt.distill``): the
        head learns on raw target features what the teacher does on re-standardised ones,
        while the source rows keep it honest.
        """
        k = data.current.n_classes
        feats = data.candidates.features
        d = feats.shape[-1]
        sw = self.cfg.source_weight
        tx = feats[cells].reshape(-1, d)
        parts = [(tx, np.eye(k, dtype=np.float32)[np.repeat(labels, feats.shape[1])], 1.0),
                 (data.train_x, np.eye(k, dtype=np.float32)[data.train_y], sw)]
        if distill and self.cfg.distill > 0:
            rows = feats[~data.heldout].reshape(-1, d)
            parts.append((rows, probabilities(data.teacher.logits(rows), False), self.cfg.distill))
        x = np.concatenate([p[0] for p in parts])
        t = np.concatenate([p[1] for p in parts])
        w = np.concatenate([np.full(len(p[0]), p[2] / max(len(p[0]), 1)) for p in parts])
        return fit_head(x, t, w, init or data.current, data.source, self.cfg.l2, deadline)

    def gate(self, head: LinearHead, data: AdaptationData) -> GateResult:
        """Promotion criteria; ``figures`` carries the before/after numbers."""
        cfg = self.cfg
        src_ref = accuracy(data.source, data.holdout_x, data.holdout_y)
        src_before = accuracy(data.current, data.holdout_x, data.holdout_y)
        src_after = accuracy(head, data.holdout_x, data.holdout_y)
        k = head.n_classes
        feats = data.candidates.features
        ent_after = class_entropy(self._fused(head, feats).argmax(1), k)
        held = np.flatnonzero(data.heldout)
        teacher_says = self._fused(data.teacher, feats[held]).argmax(1)
        agree_before = _agreement(self._fused(data.current, feats[data.validation]),
                                  data.pseudo[data.validation])
        agree_after = _agreement(self._fused(head, feats[data.validation]),
                                 data.pseudo[data.validation])
        teacher_before = _agreement(self._fused(data.current, feats[held]), teacher_says)
        teacher_after = _agreement(self._fused(head, feats[held]), teacher_says)
        failures = []
        if src_after < src_ref - cfg.max_source_drop - 1e-9:
            failures.append(f"source holdout accuracy {src_after:.4f} < source head "
                            f"{src_ref:.4f} - {cfg.max_source_drop}")
        if ent_after < cfg.min_entropy:
            failures.append(f"class collapse: predicted-class entropy {ent_after:.3f} < "
                            f"{cfg.min_entropy}")
        ceiling = cfg.agreement_ceiling
        if len(data.validation) == 0:
            failures.append("no confirmed cells among the held-out target cells")
        elif agree_after < min(agree_before, ceiling) - 1e-9:
            failures.append(f"agreement with held-out confirmed target cells fell "
                            f"({agree_before:.4f} → {agree_after:.4f})")
        elif agree_before < ceiling and not agree_after > agree_before:
            failures.append(f"agreement with held-out confirmed target cells did not rise "
                            f"({agree_before:.4f} → {agree_after:.4f})")
        elif agree_before >= ceiling and not teacher_after > teacher_before:
            failures.append(f"agreement with confirmed cells at the ceiling and agreement with "
                            f"the teacher on held-out cells did not rise "
                            f"({teacher_before:.4f} → {teacher_after:.4f})")
        figures = {"source_acc_source_head": src_ref, "source_acc_before": src_before,
                   "source_acc_after": src_after, "target_entropy_after": ent_after,
                   "agreement_before": agree_before, "agreement_after": agree_after,
                   "teacher_agreement_before": teacher_before,
                   "teacher_agreement_after": teacher_after}
        return GateResult(not failures, failures, figures)

    # -- the whole job -----------------------------------------------------------------

    def run(self, reason: str = "manual") -> AdaptationReport:
        """One gated job; never raises for expected outcomes (the report says what happened)."""
        if not self._job_lock.acquire(blocking=False):
            return AdaptationReport(reason, "skipped", self.models.active_version(), None,
                                    "another adaptation job is running")
        started = time.monotonic()
        try:
            first = self._input_step(reason, started + self.cfg.max_seconds)
            if first is not None and first.promoted:
                report = first
            else:  # no new expert (or a refused one, kept for inspection): a head step
                report = self._head_step(reason, started + self.cfg.max_seconds)
                report.refused_input = first.as_dict() if first is not None else None
        except AdaptationError as exc:
            report = AdaptationReport(reason, "skipped", self.models.active_version(), None,
                                      str(exc))
        finally:
            self._job_lock.release()
        self._mark_job(report)
        report.seconds = time.monotonic() - started
        log.info("adaptation (%s): %s %s", reason, report.action, report.message)
        return report

    def _head_step(self, reason: str, deadline: float) -> AdaptationReport:
        cfg = self.cfg
        data = self.prepare()
        before = data.bundle.version
        chain = self.lineage(data.bundle)
        current_entropy = class_entropy(
            self._fused(data.current, data.candidates.features).argmax(1), data.current.n_classes)
        if len(chain) > 1 and (len(chain) - 1 >= cfg.reset_after
                               or current_entropy < cfg.min_entropy):
            why = (f"{len(chain) - 1} adapted versions since the source"
                   if len(chain) - 1 >= cfg.reset_after
                   else f"current head collapsed (entropy {current_entropy:.3f})")
            bundle = self.models.activate(chain[-1])
            return AdaptationReport(reason, "reset", before, chain[-1], f"reset to source: {why}",
                                    counts=data.counts, bundle_path=str(bundle.path))
        if len(data.confirmed) < cfg.min_samples:
            return AdaptationReport(
                reason, "skipped", before, None,
                f"{len(data.confirmed)} confirmed cells < adapt.min_samples {cfg.min_samples}",
                counts=data.counts)
        head, rounds = self._rounds(data, deadline)
        gate = self.gate(head, data)
        report = AdaptationReport(reason, "promoted" if gate.passed else "rejected", before,
                                  None, "; ".join(gate.failures), domain=data.domain,
                                  counts=data.counts,
                                  gate={"passed": gate.passed, "failures": gate.failures,
                                        **gate.figures}, rounds=rounds)
        self._publish(data.bundle, report, head=head)
        return report

    def _input_step(self, reason: str, deadline: float) -> AdaptationReport | None:
        """A new expert for a new sensor: calibrated input and the source head, routed to.

        Runs when the active bundle has no adapted expert yet. The stored scenes' band
        moments split into the new domain and source-like scenes (``_domain_scenes``); when
        the new domain's pooled moments are more than ``adapt.input_tolerance`` from the
        source reference (``routing.radiometric_distance``), a new version adds a
        ``Domain``: that signature, an input spec that re-standardises it towards the
        reference (``adapt.input_blend`` of the way; folded into mean/std), a copy of the
        source head, which expects source-like inputs, and a backbone whose layers are
        re-normalised on the domain's stored tiles (``_expert_backbone``). Head steps then
        refine that expert. Source-sensor scenes keep routing to the source model, so the
        step costs them nothing. The gate refuses it unless at least
        ``adapt.domain_min_fraction`` of the stored scenes would route to the new expert
        (a signature that cannot tell the domains apart would misroute) and the expert
        passes ``_expert_check`` on held-out tiles. Returns None when there is nothing to
        do: the job goes on to a head step.
        """
        cfg = self.cfg
        if cfg.input_blend <= 0:
            return None
        bundle = self.models.active()
        chain = self.lineage(bundle)
        if bundle.manifest.domains or len(chain) - 1 >= cfg.reset_after:
            return None  # refine the expert in hand; a reset to the source starts over
        stored = self.store.load(key="", features=False)
        if len(stored.bands) == 0 or stored.bands.shape[-1] != len(bundle.manifest.input.bands):
            return None
        source_bundle = load_bundle(self.models.dir_for(chain[-1]))
        ref = source_bundle.reference.bands
        members, (mean_t, std_t, sharp_t) = _domain_scenes(stored, source_signature(ref))
        if not members.any():
            return None
        before = radiometric_distance((mean_t, std_t, sharp_t), source_signature(ref))
        if before <= cfg.input_tolerance:
            return None  # radiometry unchanged (blur, season of the same sensor): head steps
        proposal = InputAlignment.blended(ref, mean_t, std_t, cfg.input_blend)
        fraction = float(members.mean())
        spec = proposal.spec(source_bundle.manifest.input)
        seqs = [q for q, keep in zip(stored.seqs, members, strict=True) if keep]
        tiles = self.store.tiles(seqs, cfg.renorm_tiles)
        failures = [] if fraction >= cfg.domain_min_fraction else [
            f"only {fraction:.0%} of the stored scenes route to the new domain < "
            f"adapt.domain_min_fraction {cfg.domain_min_fraction:.0%}"]
        gate: dict[str, Any] = {
            "radiometric_distance_before": before,
            "radiometric_distance_after": proposal.distance(ref, mean_t, std_t),
            "domain_fraction": fraction,
            "gain": [round(float(g), 4) for g in proposal.gain],
            "offset": [round(float(o), 3) for o in proposal.offset]}
        with tempfile.TemporaryDirectory(dir=self.root) as tmp:
            backbone = self._expert_backbone(source_bundle, spec, tiles, Path(tmp), gate,
                                             deadline)
            reference = None
            if tiles is not None:  # the expert's features on its tiles, computed once
                feats = _features(spec, backbone or source_bundle.file(BACKBONE), tiles)
                failures += self._expert_check(source_bundle, tiles, feats, gate)
                reference = Path(tmp) / f"reference.{DOMAIN}.json"  # its drift baseline
                atomic_write_text(reference, _expert_reference(
                    source_bundle, spec, tiles, feats).model_dump_json(by_alias=True))
            domain = Domain(name=DOMAIN, mean=[float(v) for v in mean_t],
                            std=[float(v) for v in std_t],
                            sharpness=None if sharp_t is None else [float(v) for v in sharp_t],
                            input=spec,
                            classifier=f"classifier.{DOMAIN}.onnx",
                            backbone=None if backbone is None else backbone.name,
                            reference=None if reference is None else reference.name)
            files = {domain.classifier: source_bundle.file(CLASSIFIER)}
            for extra in (backbone, reference):
                if extra is not None:
                    files[extra.name] = extra
            report = AdaptationReport(
                reason, "rejected" if failures else "promoted", bundle.version, None,
                step="input", domain=DOMAIN, message="; ".join(failures),
                counts={"scenes": len(stored.bands), "domain_scenes": int(members.sum()),
                        "tiles": 0 if tiles is None else len(tiles)},
                gate={"passed": not failures, "failures": failures, **gate})
            self._publish(bundle, report, domains=[domain], files=files)
        return report

    def _expert_backbone(self, source: Bundle, spec: InputSpec, tiles: np.ndarray | None,
                         tmp: Path, gate: dict[str, Any], deadline: float) -> Path | None:
        """The source backbone re-normalised on the new domain's stored tiles (every
        ``adapt.holdout_every``-th tile kept out for ``_expert_check``), written under
        ``tmp``; None when switched off, when the bundle has no layer statistics or when
        too few tiles were kept: the expert then shares the source backbone."""
        cfg = self.cfg
        if cfg.renorm_blend <= 0 or LAYER_STATS not in source.manifest.files:
            return None
        fit = None if tiles is None else tiles[np.arange(len(tiles)) % cfg.holdout_every != 0]
        if fit is None or len(fit) < MIN_RENORM_TILES:
            gate["renorm"] = {"skipped": f"{0 if fit is None else len(fit)} target tiles "
                                         f"(< {MIN_RENORM_TILES})"}
            return None
        renorm = renormalise(source.file(BACKBONE), spec.normalise(fit),
                             LayerStats.load(source.file(LAYER_STATS)), cfg.renorm_blend,
                             deadline)
        gate["renorm"] = {"layers": renorm.layers, "tiles": renorm.tiles,
                          "blend": cfg.renorm_blend, "layer_shift_before": renorm.shift_before,
                          "seconds": round(renorm.seconds, 2)}
        path = tmp / f"backbone.{DOMAIN}.onnx"
        onnx.save(renorm.model, str(path))
        return path

    def _expert_check(self, source: Bundle, tiles: np.ndarray, expert_feats: np.ndarray,
                      gate: dict[str, Any]) -> list[str]:
        """Label-free check of a new expert on held-out target tiles (every
        ``adapt.holdout_every``-th, never used by the re-normalisation), against the source
        model on the same tiles: the share of tiles whose ``adapt.k`` nearest source-bank
        features confirm the predicted class (``adapt.agreement``) must not fall, and the
        predicted classes must not collapse (``adapt.min_entropy``). A broken
        re-normalisation or calibration fails both. ``expert_feats`` are the expert's
        features of all ``tiles``."""
        held = np.arange(len(tiles)) % self.cfg.holdout_every == 0
        head = read_head(source.file(CLASSIFIER))
        bank = source.source_bank
        train = ~bank.holdout
        index = faiss.IndexFlatL2(bank.features.shape[1])
        index.add(np.ascontiguousarray(bank.features[train]))
        bank_labels = bank.labels[train].astype(np.int64)

        def judge(feats: np.ndarray) -> dict[str, float]:
            probs = probabilities(head.logits(feats), multi_label=False)
            labels = probs.argmax(axis=1)
            agree = retrieval_agreement(index, bank_labels, feats, labels, self.cfg.k)
            return {"confirmed": float((agree >= self.cfg.agreement).mean()),
                    "entropy": class_entropy(labels, head.n_classes),
                    "confidence": float(probs.max(axis=1).mean())}

        before = judge(_features(source.manifest.input, source.file(BACKBONE), tiles[held]))
        after = judge(expert_feats[held])
        gate["check"] = {"tiles": int(held.sum()), "source_model": before, "expert": after}
        failures = []
        if after["confirmed"] < before["confirmed"] - 1e-9:
            failures.append(f"retrieval-confirmed share of held-out target tiles fell "
                            f"({before['confirmed']:.3f} → {after['confirmed']:.3f})")
        if after["entropy"] < self.cfg.min_entropy:
            failures.append(f"class collapse on held-out target tiles: entropy "
                            f"{after['entropy']:.3f} < {self.cfg.min_entropy}")
        return failures

    def _rounds(self, data: AdaptationData, deadline: float
                ) -> tuple[LinearHead, list[dict[str, Any]]]:
        """Self-training rounds: the teacher (aligned source head), then teacher ⊕ new head."""
        feats = data.candidates.features
        cells, labels = data.confirmed, data.pseudo[data.confirmed]
        head = self.fit(data, cells, labels, deadline, distill=True)
        rounds = [{"round": 1, "confirmed": len(cells)}]
        teacher_probs = self._fused(data.teacher, feats)
        for r in range(2, self.cfg.rounds + 1):
            if time.monotonic() > deadline:
                break
            probs = 0.5 * (teacher_probs + self._fused(head, feats))
            bank_labels = data.train_y
            cells = self._confirm(probs, feats, data.alignment, data.index, bank_labels)
            cells = cells[~data.heldout[cells]]
            if len(cells) < self.cfg.min_samples:
                break
            labels = probs.argmax(axis=1)[cells]
            head = self.fit(data, cells, labels, deadline, init=head, distill=True)
            rounds.append({"round": r, "confirmed": len(cells)})
        return head, rounds

    def _prune_rejected(self) -> None:
        """Keep the newest ``adapt.keep_rejected`` refused candidates: a box that stays off
        its source domain runs a job every few scenes, and each keeps a bundle copy."""
        kept = sorted(p for p in self.rejected_dir.iterdir() if p.is_dir())
        for old in kept[: max(len(kept) - self.cfg.keep_rejected, 0)]:
            shutil.rmtree(old, ignore_errors=True)

    def _publish(self, bundle: Bundle, report: AdaptationReport, head: LinearHead | None = None,
                 domains: list[Domain] | None = None, files: dict[str, Path] | None = None
                 ) -> None:
        """Write the candidate bundle: a copy of ``bundle`` with a new head for
        ``report.domain``, or new experts (``domains``) and their ``files``; install and
        activate it when the gate passed, else keep it under ``rejected/``."""
        version = self.models.next_version()
        build = Path(tempfile.mkdtemp(prefix=".build-", dir=self.root))
        try:
            shutil.copytree(bundle.path, build, dirs_exist_ok=True)
            if head is not None:
                target = bundle.classifier(report.domain)
                write_head(head, build / target.name, like=target)
            for name, file in (files or {}).items():
                shutil.copyfile(file, build / name)
            metrics = dict(bundle.manifest.metrics)
            metrics["adaptation"] = {"reason": report.reason, "step": report.step,
                                     "counts": report.counts, "gate": report.gate}
            manifest = bundle.manifest.model_copy(update={
                "version": version, "parent": bundle.version,
                "domains": bundle.manifest.domains if domains is None else domains,
                "files": {**bundle.manifest.files, **dict.fromkeys(files or {}, "")},
                "created": datetime.now(timezone.utc), "metrics": metrics,
                "notes": f"adapted ({report.step}) from v{bundle.version}: {report.reason}"})
            seal_bundle(build, manifest)
            if report.action == "promoted":
                installed = self.models.install(build, activate=True)
                report.version_after = installed.version
                report.bundle_path = str(installed.path)
                pruned = self.models.prune(self.cfg.keep_versions)
                if pruned:
                    log.info("pruned model versions %s", pruned)
            else:
                self.rejected_dir.mkdir(parents=True, exist_ok=True)
                stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%f")
                kept = self.rejected_dir / f"{stamp}-{report.step}-from-v{bundle.version:04d}"
                (build / "report.json").write_text(json.dumps(report.as_dict(), indent=2))
                build.replace(kept)
                report.kept_at = str(kept)
                self._prune_rejected()
        finally:
            shutil.rmtree(build, ignore_errors=True)
