"""The input step: an expert for each new sensor, calibrated and routed to.

The stored scenes' signatures split into the domains the bundle already routes to (the
source's and each expert's) and new ones (``domains.split_domains``: anchored k-means, k
chosen by separation, ``adapt.input_tolerance`` apart). The largest new domain gets a
proposed version with one more ``Expert``: its signature, an input spec that
re-standardises it towards the source reference (``adapt.input_blend`` of the way, folded
into mean/std), a copy of the source head, a backbone whose layers are re-normalised on
the domain's stored tiles (``ExpertStep.backbone``) and the domain's drift reference as the
expert sees it (``expert_reference``). Head steps then refine it; source-sensor scenes keep
routing to the source model, other sensors' scenes to their own experts.

An expert made early from a few stored scenes is made again (same name, same gates: a
replacement by itself) from its own stored scenes once they number ``adapt.refine_growth``
times as many: its signature, input alignment and re-normalisation are then pooled from
more of its sensor, before any new domain is looked for.

A new domain nearest an existing expert whose scenes stopped arriving once the new domain's
began (at most ``1 − adapt.domain_min_fraction`` of the two after the new one's first
scene) is that expert's domain moved on, a gradual drift: the new expert *replaces* it
under the same name. Otherwise it is a second domain beside the first and gets an expert of
its own, up to ``adapt.max_experts``.

Its gate refuses the expert unless at least ``adapt.domain_min_fraction`` of the new
domain's newer stored scenes (its later half: a domain that grows out of the source's has
its first scenes still among the source's) would route to it and as large a share of all
the scenes that would route to it are the domain's (a signature that cannot tell the
domains apart would misroute), and it passes ``ExpertStep.check`` on held-out tiles.
Routing, here and on the box, counts the expert's margin (``routing.source_margin``): at
most ``adapt.source_allowance`` of the source's sample scenes (``Reference.scenes``: small scenes
of the source's own chips) may route to it.
The samples are what the stored scenes cannot show when every one of them is shifted, as
in a haze that grows: a faint shift's signature lies among the source scenes' own spread,
and an expert for it would take source scenes from the source model; with the margin its
own scenes stay with the source too, so it is refused until the shift stands clear.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
import onnx

from appliance.adapt.alignment import InputAlignment
from appliance.adapt.candidates import CandidateStore
from appliance.adapt.domains import DomainSplit, NewDomain, Pool, split_domains
from appliance.adapt.learning import SourceRows, class_entropy, retrieval_agreement
from appliance.adapt.lineage import Lineage, expert_name
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
from appliance.contract.signature import (
    Signature,
    domain_signature,
    radiometric_distance,
    sample_signature,
    source_signature,
)
from appliance.model.head import read_head
from appliance.model.routing import Routes, route_among, source_margin
from appliance.model.runtime import ProviderPlan, open_session, probabilities

log = logging.getLogger(__name__)

MIN_RENORM_TILES = 8  # fewer target tiles than this give channel statistics too noisy to use
CPU_ONLY = ProviderPlan(providers=("cpu",))  # a job's checks: off the GPU the daemon infers on


def backbone_features(spec: InputSpec, backbone: Path, tiles: np.ndarray) -> np.ndarray:
    """Pooled features [n,D] of value-range ``tiles`` through ``backbone`` on the CPU (a job
    leaves the accelerator to the daemon's inference)."""
    session = open_session(backbone, CPU_ONLY)
    return np.concatenate([
        np.asarray(session.run([FEATURES], {IMAGE_INPUT: spec.normalise(tiles[i:i + 32])})[0])
        for i in range(0, len(tiles), 32)])


def newest(members: np.ndarray, keep: int) -> np.ndarray:
    """[m] bool: the newer half of ``members`` (stored scenes are in arrival order), at
    least ``keep`` of them: the domain as it is now, the scenes its expert serves next."""
    rows = np.flatnonzero(members)
    out = np.zeros(len(members), bool)
    out[rows[len(rows) - max(keep, (len(rows) + 1) // 2):]] = True
    return out


def routed_share(scenes: list[Signature], members: np.ndarray, others: np.ndarray,
                 routes: Routes, name: str, keep: int) -> float:
    """How well routing among ``routes`` serves a new domain ``name``: the smaller of the
    share of its newer members (``newest``, at least ``keep``) routed to it and the share
    of all the scenes routed to it that are members; scenes in ``others`` ([m] bool: a
    replaced expert's, the same domain earlier) count neither way.

    Coverage is judged on the newer members because a domain that grows out of another (a
    haze that thickens scene by scene) has its early members still among the source's
    scenes, where the margin rightly keeps them; what the expert must catch is the domain
    as it arrives now. Purity is judged on every stored scene: no scene of another domain
    may be taken, however old."""
    routed = np.array([route_among(s, routes) == name for s in scenes])
    recent = newest(members, keep)
    claimed = int((routed & ~others).sum())
    return min(int((routed & recent).sum()) / max(int(recent.sum()), 1),
               int((routed & members).sum()) / max(claimed, 1))


def source_samples(source: Bundle, sharp: bool) -> list[Signature]:
    """The source's sample scenes' signatures (``Reference.scenes``; none in a bundle
    exported without them), with sharpness or not, like with like."""
    return [sample_signature(s, sharp) for s in source.reference.scenes]


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

    def run(self, lineage: Lineage, reason: str, deadline: float, work: Path,
            taken: frozenset[str] = frozenset()) -> Proposal | None:
        """The gated expert (its files written under ``work``), or None when there is
        nothing to do: the job goes on to a head step. ``taken``: expert names used before
        (retired ones too), never given to a new expert."""
        cfg = self.cfg
        bundle, source = lineage.bundle, lineage.source
        if cfg.input_blend <= 0 or worn_out(lineage.adapted_versions, cfg):
            return None  # a reset to the source starts over
        stored = self.store.load(features=False)
        if len(stored.bands) == 0 or stored.bands.shape[-1] != len(bundle.manifest.input.bands):
            return None
        ref = source.reference.bands
        src = source_signature(ref)
        sharp = src[2] is not None  # like with like, as in routing
        experts = list(bundle.manifest.experts)
        names: list[str | None] = [None, *(d.name for d in experts)]
        scenes = stored.scene_signatures(sharp)
        pool: Pool = partial(stored.signature, sharp=sharp)
        split = split_domains(scenes, pool, [src, *(domain_signature(d) for d in experts)],
                              cfg.input_tolerance, cfg.domain_min_scenes, cfg.max_experts)
        grown = self.grown(split, experts, pool, src)
        if grown is not None:  # an expert made from a few scenes, made again from more
            new, replaces = grown, names[grown.nearest_anchor]
        elif split.domains:
            new = split.domains[0]
            replaces = self.moved_on(split, new, names)
        else:
            return None  # every stored scene is a known domain: head steps
        if replaces is None and len(experts) >= cfg.max_experts:
            log.info("a new domain of %d stored scenes gets no expert: adapt.max_experts (%d) "
                     "are in use", int(new.members.sum()), cfg.max_experts)
            return None
        name = replaces or expert_name(set(taken) | {d.name for d in experts})
        kept = [d for d in experts if d.name != replaces]
        mean_t, std_t, sharp_t = new.signature
        members = new.members
        before = radiometric_distance(new.signature, src)
        alignment = InputAlignment.blended(ref, mean_t, std_t, cfg.input_blend)
        samples = source_samples(source, sharp)
        margin = source_margin(samples, src, new.signature, cfg.source_allowance)
        routes: Routes = {None: (src, 0.0), **{d.name: (domain_signature(d), d.margin)
                                                 for d in kept},
                          name: (new.signature, margin)}
        earlier = (split.labels == names.index(replaces) if replaces and grown is None
                   else np.zeros(len(scenes), bool))  # a moved-on expert's own scenes
        fraction = routed_share(scenes, members, earlier, routes, name, cfg.domain_min_scenes)
        spec = alignment.spec(source.manifest.input)
        seqs = [q for q, keep in zip(stored.seqs, members, strict=True) if keep]
        tiles = self.store.tiles(seqs, cfg.renorm_tiles)
        failures = [] if fraction >= cfg.domain_min_fraction else [
            f"only {fraction:.0%} of the new domain's newer stored scenes route to its expert "
            f"(or of those routed to it are its own) < adapt.domain_min_fraction "
            f"{cfg.domain_min_fraction:.0%}"]
        backbone, renorm = self.backbone(source, spec, tiles, work, name, deadline)
        reference, check = None, None
        if tiles is not None:  # the expert's features on its tiles, computed once
            feats = backbone_features(spec, backbone or source.file(BACKBONE), tiles)
            check_failures, check = self.check(source, tiles, feats)
            failures += check_failures
            reference = work / f"reference.{name}.json"  # its drift baseline
            atomic_write_text(reference, expert_reference(
                source, spec, tiles, feats).model_dump_json(by_alias=True))
        domain = Expert(name=name, mean=[float(v) for v in mean_t],
                        std=[float(v) for v in std_t],
                        sharpness=None if sharp_t is None else [float(v) for v in sharp_t],
                        input=spec,
                        classifier=f"classifier.{name}.onnx",
                        backbone=None if backbone is None else backbone.name,
                        reference=None if reference is None else reference.name,
                        margin=margin, scenes=int(members.sum()))
        files = {domain.classifier: source.file(CLASSIFIER)}
        for extra in (backbone, reference):
            if extra is not None:
                files[extra.name] = extra
        gate = InputGate(
            passed=not failures, failures=failures, radiometric_distance_before=before,
            radiometric_distance_after=alignment.distance(ref, mean_t, std_t),
            domain_fraction=fraction, routing_margin=margin,
            gain=[round(float(g), 4) for g in alignment.gain],
            offset=[round(float(o), 3) for o in alignment.offset], renorm=renorm, check=check)
        report = AdaptationReport(
            reason=reason, action="rejected" if failures else "promoted",
            version_before=bundle.version, step="input", domain=name,
            replaced=replaces is not None, message="; ".join(failures),
            counts=InputCounts(scenes=len(stored.bands), domain_scenes=int(members.sum()),
                               tiles=0 if tiles is None else len(tiles)),
            gate=gate)
        return Proposal(report, files, experts=[*kept, domain])

    def grown(self, split: DomainSplit, experts: list[Expert], pool: Pool,
              source: Signature) -> NewDomain | None:
        """The existing expert whose own stored scenes (those ``split`` gives its anchor)
        number ``adapt.refine_growth`` times the scenes it was pooled from or more, as a
        domain to make it again from (the largest growth first), or None."""
        if not self.cfg.refine_growth:
            return None
        best: tuple[float, NewDomain] | None = None
        for i, expert in enumerate(experts, start=1):  # anchor 0 is the source
            if expert.scenes is None:
                continue
            members = split.labels == i
            growth = int(members.sum()) / expert.scenes
            if growth >= self.cfg.refine_growth and (best is None or growth > best[0]):
                signature = pool(members)
                best = growth, NewDomain(members, signature, i,
                                         radiometric_distance(signature, source))
        return None if best is None else best[1]

    def moved_on(self, split: DomainSplit, new: NewDomain, names: list[str | None]
                 ) -> str | None:
        """The expert whose domain ``new`` is, moved on (gradual drift), or None: ``new`` is
        nearest that expert's signature and, from ``new``'s first stored scene on, at most
        ``1 − adapt.domain_min_fraction`` of the scenes of the two were still the expert's."""
        anchor = new.nearest_anchor
        if anchor == 0:
            return None  # nearest the source: a domain of its own
        first = int(np.argmax(new.members))  # stored scenes are in arrival order
        still = int((split.labels[first:] == anchor).sum())
        share = still / (still + int(new.members.sum()))
        return names[anchor] if share <= 1 - self.cfg.domain_min_fraction else None

    def backbone(self, source: Bundle, spec: InputSpec, tiles: np.ndarray | None, work: Path,
                 name: str, deadline: float
                 ) -> tuple[Path | None, Renorm | RenormSkipped | None]:
        """The source backbone re-normalised on the new domain's stored tiles (every
        ``adapt.holdout_every``-th tile kept out for ``check``), written under ``work`` as
        expert ``name``'s, and how; None when switched off, when the bundle has no layer
        statistics or when too few tiles were kept: the expert then shares the source
        backbone."""
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
        path = work / f"backbone.{name}.onnx"
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
