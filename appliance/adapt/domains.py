"""Which stored scenes form new domains: k-means over scene signatures beside fixed anchors.

A box may meet several new sensors at once, interleaved with source-sensor scenes, and may
already hold experts for some. The stored scenes' signatures (per-band moments and
sharpness, ``contract.signature``) are clustered around the signatures the bundle already
routes to (the *anchors*: the source's and every expert's, never moved) plus ``k`` free
centres. The free centres start at the scenes farthest from every centre so far, each
scene joins its nearest centre, a free centre is re-pooled from its members, a few rounds
over. A free cluster with fewer than ``adapt.domain_min_scenes`` scenes dissolves (one odd
scene never makes a domain), and so does one whose pooled signature is within
``adapt.input_tolerance`` of an anchor (it is that anchor's domain, seen a little apart).

``k`` is chosen by separation: the largest ``k`` whose surviving clusters are all further
than ``adapt.input_tolerance`` from each other (two centres in one real domain are not);
a larger ``k`` that finds no more clusters than a smaller one is not taken. Anchors never
move, so an existing domain is never found again as a new one, and a job cannot swing
routing back and forth between two experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from appliance.contract.signature import Signature, radiometric_distance

Pool = Callable[[np.ndarray], Signature]
"""The pooled signature of the stored scenes a [m] bool mask selects."""


@dataclass(frozen=True)
class NewDomain:
    """A cluster of stored scenes that no anchor claims: its members ([m] bool), pooled
    signature, nearest anchor (index into the anchors) and distance to it."""

    members: np.ndarray
    signature: Signature
    nearest_anchor: int
    distance: float


@dataclass(frozen=True)
class DomainSplit:
    """Every stored scene's cluster: ``labels`` [m], ``0..A-1`` the anchors in the order
    given, ``A + i`` the new domain ``domains[i]``; new domains largest first."""

    labels: np.ndarray
    domains: list[NewDomain]


def _nearest(scene: Signature, centres: list[Signature]) -> int:
    """Index of the centre nearest ``scene`` (the first on a tie: anchors before new)."""
    return int(np.argmin([radiometric_distance(scene, c) for c in centres]))


def _cluster(scenes: list[Signature], pool: Pool, anchors: list[Signature], k: int,
             tolerance: float, min_scenes: int, rounds: int) -> DomainSplit:
    """Anchored k-means with ``k`` free centres; clusters too small or too near an anchor
    dissolve into the anchors."""
    free: list[Signature] = []
    for _ in range(k):  # farthest-point start: deterministic, away from what is known
        far = [min(radiometric_distance(s, c) for c in anchors + free) for s in scenes]
        pick = int(np.argmax(far))
        if far[pick] <= tolerance:
            break
        free.append(scenes[pick])
    labels = np.zeros(len(scenes), np.int64)
    for _ in range(rounds):
        labels = np.array([_nearest(s, anchors + free) for s in scenes], np.int64)
        kept = []
        for i in range(len(free)):
            members = labels == len(anchors) + i
            if members.sum() < min_scenes:
                continue
            signature = pool(members)
            if min(radiometric_distance(signature, a) for a in anchors) <= tolerance:
                continue
            kept.append(signature)
        moved = len(kept) != len(free) or any(
            radiometric_distance(a, b) > 1e-9 for a, b in zip(kept, free, strict=False))
        free = kept
        if not moved:
            break
    labels = np.array([_nearest(s, anchors + free) for s in scenes], np.int64)
    domains = []
    for i in range(len(free)):
        members = labels == len(anchors) + i
        if not members.any():
            continue
        signature = pool(members)
        gaps = [radiometric_distance(signature, a) for a in anchors]
        domains.append(NewDomain(members, signature, int(np.argmin(gaps)), float(min(gaps))))
    order = sorted(range(len(domains)), key=lambda i: -int(domains[i].members.sum()))
    relabel = {len(anchors) + old: len(anchors) + new for new, old in enumerate(order)}
    return DomainSplit(np.array([relabel.get(int(v), int(v)) for v in labels], np.int64),
                       [domains[i] for i in order])


def _separated(split: DomainSplit, tolerance: float) -> bool:
    """Whether every two new domains are further than ``tolerance`` apart (both ways)."""
    sigs = [d.signature for d in split.domains]
    return all(min(radiometric_distance(a, b), radiometric_distance(b, a)) > tolerance
               for i, a in enumerate(sigs) for b in sigs[i + 1:])


def split_domains(scenes: list[Signature], pool: Pool, anchors: list[Signature],
                  tolerance: float, min_scenes: int, max_new: int, rounds: int = 10
                  ) -> DomainSplit:
    """The stored ``scenes`` split into the ``anchors``' domains and new ones (at most
    ``max_new``), ``k`` chosen by separation (module docstring)."""
    best = DomainSplit(np.array([_nearest(s, anchors) for s in scenes], np.int64), [])
    for k in range(1, max_new + 1):
        split = _cluster(scenes, pool, anchors, k, tolerance, min_scenes, rounds)
        if not _separated(split, tolerance):
            break
        if len(split.domains) > len(best.domains):
            best = split
    return best
