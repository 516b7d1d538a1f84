"""The input step: a new expert for a new sensor, calibrated and routed to.

Runs while the bundle has no adapted expert yet. The stored scenes' band moments split into
the new domain and source-like scenes (``domain_scenes``); when the new domain's pooled
moments are more than ``adapt.input_tolerance`` from the source reference, the step
proposes a version with one more ``Expert``: that signature, an input spec that
re-standardises it towards the reference (``adapt.input_blend`` of the way, folded into
mean/std), a copy of the source head, a backbone whose layers are re-normalised on the
domain's stored tiles (``ExpertStep.backbone``) and the domain's drift reference as the
expert sees it (``expert_reference``). Head steps then refine that expert; source-sensor
scenes keep routing to the source model.

Its gate refuses the expert unless at least ``adapt.domain_min_fraction`` of the stored
scenes would route to it (a signature that cannot tell the domains apart would misroute)
and it passes ``ExpertStep.check`` on held-out tiles.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from appliance.adapt.alignment import InputAlignment
from appliance.adapt.candidates import Candidates, CandidateStore
from appliance.adapt.learning import SourceRows, class_entropy, retrieval_agreement
from appliance.adapt.lineage import DOMAIN, Lineage
from appliance.adapt.proposal import Proposal
from appliance.adapt.renorm import renormalise
from appliance.adapt.reset import worn_out
from appliance.config import AdaptConfig
from appliance.contract.bundle import (
    BACKBONE,
    CLASSIFIER,
    FEATURES,
    IMAGE_INPUT,
    LAYER_STATS,
    Bundle,
    Expert,
    InputSpec,
    Reference,
)
from appliance.contract.durable import atomic_write_text
from appliance.contract.layer_stats import LayerStats
from appliance.contract.payloads import (
    AdaptationReport,
    CheckFigures,
    ExpertCheck,
    InputCounts,
    InputGate,
    Renorm,
    RenormSkipped,
)
from appliance.contract.reference_stats import reference_from_tiles
from appliance.contract.signature import Signature, radiometric_distance, source_signature
from appliance.model.head import read_head
from appliance.model.routing import nearest
from appliance.model.runtime import ProviderPlan, open_session, probabilities

MIN_RENORM_TILES = 8  # fewer target tiles than this give channel statistics too noisy to use
CPU_ONLY = ProviderPlan(providers=("cpu",))  # a job's checks: off the GPU the daemon infers on


def backbone_features(spec: InputSpec, backbone: Path, tiles: np.ndarray) -> np.ndarray:
    """Pooled features [n,D] of value-range ``tiles`` through ``backbone`` on the CPU (a job
    leaves the accelerator to the daemon's inference)."""
    session = open_session(backbone, CPU_ONLY)
    return np.concatenate([
        np.asarray(session.run([FEATURES], {IMAGE_INPUT: spec.normalise(tiles[i:i + 32])})[0])
        for i in range(0, len(tiles), 32)])


def domain_scenes(stored: Candidates, source: Signature, rounds: int = 5
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


def expert_reference(source: Bundle, spec: InputSpec, tiles: np.ndarray,
                     feats: np.ndarray) -> Reference:
    """The drift reference of a new domain as its expert sees it: the stored tiles, the
    expert's features ``feats`` of them and the source head's probabilities. Drift on
    scenes routed to the expert is judged against this (``DriftMonitor``)."""
    probs = probabilities(read_head(source.file(CLASSIFIER)).logits(feats), multi_label=False)
    return reference_from_tiles(spec.bands, tiles, feats, probs)


class ExpertStep:
    """Proposes a new expert for the stored scenes' new domain, or nothing."""

    def __init__(self, cfg: AdaptConfig, store: CandidateStore) -> None:
        self.cfg = cfg
        self.store = store

    def run(self, lineage: Lineage, reason: str, deadline: float, work: Path
            ) -> Proposal | None:
        """The gated expert (its files written under ``work``), or None when there is
        nothing to do: the job goes on to a head step."""
        cfg = self.cfg
        bundle, source = lineage.bundle, lineage.source
        if cfg.input_blend <= 0:
            return None
        if bundle.manifest.experts or worn_out(lineage.adapted_versions, cfg):
            return None  # refine the expert in hand; a reset to the source starts over
        stored = self.store.load(key="", features=False)
        if len(stored.bands) == 0 or stored.bands.shape[-1] != len(bundle.manifest.input.bands):
            return None
        ref = source.reference.bands
        members, (mean_t, std_t, sharp_t) = domain_scenes(stored, source_signature(ref))
        if not members.any():
            return None
        before = radiometric_distance((mean_t, std_t, sharp_t), source_signature(ref))
        if before <= cfg.input_tolerance:
            return None  # radiometry unchanged (blur, season of the same sensor): head steps
        alignment = InputAlignment.blended(ref, mean_t, std_t, cfg.input_blend)
        fraction = float(members.mean())
        spec = alignment.spec(source.manifest.input)
        seqs = [q for q, keep in zip(stored.seqs, members, strict=True) if keep]
        tiles = self.store.tiles(seqs, cfg.renorm_tiles)
        failures = [] if fraction >= cfg.domain_min_fraction else [
            f"only {fraction:.0%} of the stored scenes route to the new domain < "
            f"adapt.domain_min_fraction {cfg.domain_min_fraction:.0%}"]
        backbone, renorm = self.backbone(source, spec, tiles, work, deadline)
        reference, check = None, None
        if tiles is not None:  # the expert's features on its tiles, computed once
            feats = backbone_features(spec, backbone or source.file(BACKBONE), tiles)
            check_failures, check = self.check(source, tiles, feats)
            failures += check_failures
            reference = work / f"reference.{DOMAIN}.json"  # its drift baseline
            atomic_write_text(reference, expert_reference(
                source, spec, tiles, feats).model_dump_json(by_alias=True))
        domain = Expert(name=DOMAIN, mean=[float(v) for v in mean_t],
                        std=[float(v) for v in std_t],
                        sharpness=None if sharp_t is None else [float(v) for v in sharp_t],
                        input=spec,
                        classifier=f"classifier.{DOMAIN}.onnx",
                        backbone=None if backbone is None else backbone.name,
                        reference=None if reference is None else reference.name)
        files = {domain.classifier: source.file(CLASSIFIER)}
        for extra in (backbone, reference):
            if extra is not None:
                files[extra.name] = extra
        gate = InputGate(
            passed=not failures, failures=failures, radiometric_distance_before=before,
            radiometric_distance_after=alignment.distance(ref, mean_t, std_t),
            domain_fraction=fraction, gain=[round(float(g), 4) for g in alignment.gain],
            offset=[round(float(o), 3) for o in alignment.offset], renorm=renorm, check=check)
        report = AdaptationReport(
            reason=reason, action="rejected" if failures else "promoted",
            version_before=bundle.version, step="input", domain=DOMAIN,
            message="; ".join(failures),
            counts=InputCounts(scenes=len(stored.bands), domain_scenes=int(members.sum()),
                               tiles=0 if tiles is None else len(tiles)),
            gate=gate)
        return Proposal(report, files, experts=[domain])

    def backbone(self, source: Bundle, spec: InputSpec, tiles: np.ndarray | None, work: Path,
                 deadline: float) -> tuple[Path | None, Renorm | RenormSkipped | None]:
        """The source backbone re-normalised on the new domain's stored tiles (every
        ``adapt.holdout_every``-th tile kept out for ``check``), written under ``work``, and
        how; None when switched off, when the bundle has no layer statistics or when too
        few tiles were kept: the expert then shares the source backbone."""
        cfg = self.cfg
        if cfg.renorm_blend <= 0 or LAYER_STATS not in source.manifest.files:
            return None, None
        fit = None if tiles is None else tiles[np.arange(len(tiles)) % cfg.holdout_every != 0]
        if fit is None or len(fit) < MIN_RENORM_TILES:
            return None, RenormSkipped(skipped=f"{0 if fit is None else len(fit)} target tiles "
                                               f"(< {MIN_RENORM_TILES})")
        renorm = renormalise(source.file(BACKBONE), spec.normalise(fit),
                             LayerStats.load(source.file(LAYER_STATS)), cfg.renorm_blend,
                             deadline)
        path = work / f"backbone.{DOMAIN}.onnx"
        onnx.save(renorm.model, str(path))
        return path, Renorm(layers=renorm.layers, tiles=renorm.tiles, blend=cfg.renorm_blend,
                            layer_shift_before=renorm.shift_before,
                            seconds=round(renorm.seconds, 2))

    def check(self, source: Bundle, tiles: np.ndarray, expert_feats: np.ndarray
              ) -> tuple[list[str], ExpertCheck]:
        """Label-free check of a new expert on held-out target tiles (every
        ``adapt.holdout_every``-th, never used by the re-normalisation), against the source
        model on the same tiles: the share of tiles whose ``adapt.k`` nearest source-bank
        features confirm the predicted class (``adapt.agreement``) must not fall, and the
        predicted classes must not collapse (``adapt.min_entropy``). A broken
        re-normalisation or calibration fails both. ``expert_feats`` are the expert's
        features of all ``tiles``. Returns the failures and the figures."""
        cfg = self.cfg
        held = np.arange(len(tiles)) % cfg.holdout_every == 0
        head = read_head(source.file(CLASSIFIER))
        rows = SourceRows.of(source.source_bank)

        def judge(feats: np.ndarray) -> CheckFigures:
            probs = probabilities(head.logits(feats), multi_label=False)
            labels = probs.argmax(axis=1)
            agree = retrieval_agreement(rows.index, rows.train_y, feats, labels, cfg.k)
            return CheckFigures(confirmed=float((agree >= cfg.agreement).mean()),
                                entropy=class_entropy(labels, head.n_classes),
                                confidence=float(probs.max(axis=1).mean()))

        before = judge(backbone_features(source.manifest.input, source.file(BACKBONE),
                                         tiles[held]))
        after = judge(expert_feats[held])
        failures = []
        if after.confirmed < before.confirmed - 1e-9:
            failures.append(f"retrieval-confirmed share of held-out target tiles fell "
                            f"({before.confirmed:.3f} → {after.confirmed:.3f})")
        if after.entropy < cfg.min_entropy:
            failures.append(f"class collapse on held-out target tiles: entropy "
                            f"{after.entropy:.3f} < {cfg.min_entropy}")
        return failures, ExpertCheck(tiles=int(held.sum()), source_model=before, expert=after)
