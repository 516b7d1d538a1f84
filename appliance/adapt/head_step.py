"""The head step: retrieval-confirmed pseudo-labels → a new head for the adapted expert.

One job's head step, in order: ``prepare`` aligns the stored target features towards the
source statistics and makes the teacher (the source head composed with that alignment),
pseudo-labels every stored cell with it and keeps those whose nearest source-bank rows
agree (``confirm``); ``rounds`` fits a head on them and the source training rows
(``fit``), re-labelling with teacher and new head each round; ``gate`` decides. Every
``adapt.holdout_every``-th stored cell is never fitted: the gate judges on those. Before
any of it the reset policy may send the lineage back to its source instead.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.adapt.alignment import Alignment
from appliance.adapt.candidates import Candidates, CandidateStore, expert_key
from appliance.adapt.learning import (
    SourceRows,
    agreement,
    class_entropy,
    fit_head,
    fused_probs,
    retrieval_agreement,
    select_pseudo_labels,
)
from appliance.adapt.lineage import Lineage, adapted_domain
from appliance.adapt.proposal import Proposal
from appliance.adapt.reset import reset_reason
from appliance.config import AdaptConfig, TilingConfig
from appliance.contract.bundle import CLASSIFIER
from appliance.contract.payloads import AdaptationReport, HeadCounts, HeadGate, Round
from appliance.model.head import LinearHead, read_head, write_head
from appliance.model.runtime import probabilities


class AdaptationError(RuntimeError):
    """An adaptation job that cannot run (no candidates, an unadaptable head...)."""


@dataclass(frozen=True)
class AdaptationData:
    """Everything one head step learns from, computed once by ``HeadStep.prepare``."""

    lineage: Lineage
    domain: str | None  # the expert being adapted (None: the source model's own head)
    current: LinearHead
    source: LinearHead
    candidates: Candidates
    alignment: Alignment
    teacher: LinearHead  # source head composed with the alignment
    teacher_probs: np.ndarray  # [n,K] the teacher's fused probabilities per candidate cell
    pseudo: np.ndarray  # [n] pseudo-label per candidate cell (teacher argmax)
    confirmed: np.ndarray  # indexes of confirmed cells that may be fitted (round 1)
    heldout: np.ndarray  # [n] bool: cells never fitted, for the gate
    validation: np.ndarray  # indexes of confirmed held-out cells (round 1)
    bank: SourceRows
    counts: HeadCounts


class HeadStep:
    """Prepares, fits and gates a head update; proposes it (or a reset)."""

    def __init__(self, cfg: AdaptConfig, tiling: TilingConfig, store: CandidateStore) -> None:
        self.cfg = cfg
        self.tiling = tiling
        self.store = store

    def fused(self, head: LinearHead, features: np.ndarray) -> np.ndarray:
        """[n,S,D] features → [n,K] probabilities, fused as the pipeline fuses them."""
        return fused_probs(head, features, self.tiling)

    def run(self, lineage: Lineage, reason: str, deadline: float, work: Path
            ) -> AdaptationReport | Proposal:
        """A reset or skipped report, or a gated head (written under ``work``) to propose.
        Raises ``AdaptationError`` when there is nothing to adapt."""
        cfg = self.cfg
        data = self.prepare(lineage)
        before = lineage.bundle.version
        current_entropy = class_entropy(
            self.fused(data.current, data.candidates.features).argmax(1), data.current.n_classes)
        why = reset_reason(lineage.adapted_versions, current_entropy, cfg)
        if why is not None:
            return AdaptationReport(reason=reason, action="reset", version_before=before,
                                    message=f"reset to source: {why}", counts=data.counts,
                                    reset_to=lineage.versions[-1])
        if len(data.confirmed) < cfg.min_samples:
            return AdaptationReport(
                reason=reason, action="skipped", version_before=before,
                message=f"{len(data.confirmed)} confirmed cells < adapt.min_samples "
                        f"{cfg.min_samples}", counts=data.counts)
        head, rounds = self.rounds(data, deadline)
        gate = self.gate(head, data)
        target = lineage.bundle.classifier(data.domain)
        write_head(head, work / target.name, like=target)
        report = AdaptationReport(
            reason=reason, action="promoted" if gate.passed else "rejected",
            version_before=before, message="; ".join(gate.failures), domain=data.domain,
            counts=data.counts, gate=gate, rounds=rounds)
        return Proposal(report, files={target.name: work / target.name})

    def prepare(self, lineage: Lineage) -> AdaptationData:
        """Load candidates and heads, align, pseudo-label and confirm (round 1)."""
        bundle, source_bundle = lineage.bundle, lineage.source
        if bundle.manifest.task != "single-label":
            raise AdaptationError("adaptation supports single-label bundles only")
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
        rows = SourceRows.of(source_bundle.source_bank)
        ref = source_bundle.reference.features
        flat = cands.features.reshape(-1, cands.features.shape[-1])
        alignment = Alignment.blended(np.asarray(ref.mean, np.float32),
                                      np.asarray(ref.std, np.float32), flat, self.cfg.blend)
        teacher = source.composed(alignment.scale, alignment.shift)
        probs = self.fused(teacher, cands.features)
        confirmed = self.confirm(probs, cands.features, alignment, rows)
        heldout = np.arange(len(cands)) % self.cfg.holdout_every == 0
        validation = confirmed[heldout[confirmed]]
        confirmed = confirmed[~heldout[confirmed]]
        counts = HeadCounts(
            candidates=len(cands), scenes=len(np.unique(cands.scenes)),
            pseudo=int((probs.max(axis=1) >= self.cfg.tau).sum()), confirmed=len(confirmed),
            heldout=int(heldout.sum()), validation=len(validation),
            source_train=len(rows.train_y), source_holdout=len(rows.holdout_y))
        return AdaptationData(lineage, domain, current, source, cands, alignment, teacher,
                              probs, probs.argmax(axis=1), confirmed, heldout, validation,
                              rows, counts)

    def confirm(self, probs: np.ndarray, features: np.ndarray, alignment: Alignment,
                rows: SourceRows) -> np.ndarray:
        """Pseudo-labelled cells whose aligned features' source neighbours agree."""
        chosen = select_pseudo_labels(probs, self.cfg.tau, self.cfg.per_class_cap)
        if len(chosen) == 0:
            return chosen
        labels = probs.argmax(axis=1)[chosen]
        queries = alignment.apply(features[chosen].mean(axis=1))
        agree = retrieval_agreement(rows.index, rows.train_y, queries, labels, self.cfg.k)
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
        tx = feats[cells].reshape(-1, d)
        parts = [(tx, np.eye(k, dtype=np.float32)[np.repeat(labels, feats.shape[1])], 1.0),
                 (data.bank.train_x, np.eye(k, dtype=np.float32)[data.bank.train_y],
                  self.cfg.source_weight)]
        if distill and self.cfg.distill > 0:
            rows = feats[~data.heldout].reshape(-1, d)
            parts.append((rows, probabilities(data.teacher.logits(rows), False), self.cfg.distill))
        x = np.concatenate([p[0] for p in parts])
        t = np.concatenate([p[1] for p in parts])
        w = np.concatenate([np.full(len(p[0]), p[2] / max(len(p[0]), 1)) for p in parts])
        return fit_head(x, t, w, init or data.current, data.source, self.cfg.l2, deadline)

    def rounds(self, data: AdaptationData, deadline: float
               ) -> tuple[LinearHead, list[Round]]:
        """Self-training rounds: the teacher (aligned source head), then teacher ⊕ new head."""
        feats = data.candidates.features
        cells, labels = data.confirmed, data.pseudo[data.confirmed]
        head = self.fit(data, cells, labels, deadline, distill=True)
        rounds = [Round(round=1, confirmed=len(cells))]
        for r in range(2, self.cfg.rounds + 1):
            if time.monotonic() > deadline:
                break
            probs = 0.5 * (data.teacher_probs + self.fused(head, feats))
            cells = self.confirm(probs, feats, data.alignment, data.bank)
            cells = cells[~data.heldout[cells]]
            if len(cells) < self.cfg.min_samples:
                break
            labels = probs.argmax(axis=1)[cells]
            head = self.fit(data, cells, labels, deadline, init=head, distill=True)
            rounds.append(Round(round=r, confirmed=len(cells)))
        return head, rounds

    def gate(self, head: LinearHead, data: AdaptationData) -> HeadGate:
        """Promotion criteria, with the before/after figures they compare.

        Held-back source accuracy may drop at most ``adapt.max_source_drop`` below the
        source head's; predicted-class entropy on target cells stays ≥ ``adapt.min_entropy``;
        on the held-out cells agreement with their confirmed pseudo-labels must not fall and
        must rise, unless the current head is already at ``adapt.agreement_ceiling``: then
        agreement with the teacher on all held-out cells must rise instead.
        """
        cfg = self.cfg
        hx, hy = data.bank.holdout_x, data.bank.holdout_y
        src_ref = agreement(data.source.logits(hx), hy)
        src_before = agreement(data.current.logits(hx), hy)
        src_after = agreement(head.logits(hx), hy)
        feats = data.candidates.features
        ent_after = class_entropy(self.fused(head, feats).argmax(1), head.n_classes)
        held = np.flatnonzero(data.heldout)
        teacher_says = self.fused(data.teacher, feats[held]).argmax(1)
        val = data.validation
        agree_before = agreement(self.fused(data.current, feats[val]), data.pseudo[val])
        agree_after = agreement(self.fused(head, feats[val]), data.pseudo[val])
        teacher_before = agreement(self.fused(data.current, feats[held]), teacher_says)
        teacher_after = agreement(self.fused(head, feats[held]), teacher_says)
        failures = []
        if src_after < src_ref - cfg.max_source_drop - 1e-9:
            failures.append(f"source holdout accuracy {src_after:.4f} < source head "
                            f"{src_ref:.4f} - {cfg.max_source_drop}")
        if ent_after < cfg.min_entropy:
            failures.append(f"class collapse: predicted-class entropy {ent_after:.3f} < "
                            f"{cfg.min_entropy}")
        ceiling = cfg.agreement_ceiling
        if len(val) == 0:
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
        return HeadGate(passed=not failures, failures=failures,
                        source_acc_source_head=src_ref, source_acc_before=src_before,
                        source_acc_after=src_after, target_entropy_after=ent_after,
                        agreement_before=agree_before, agreement_after=agree_after,
                        teacher_agreement_before=teacher_before,
                        teacher_agreement_after=teacher_after)
