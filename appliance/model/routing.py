"""Routing a scene to the expert of its domain by its radiometry.

A bundle adapted in the field holds more than one expert (``bundle.Expert``): the source
model and one calibrated to the sensor the box drifted to. Which one classifies a scene is
decided before any tile is read, from the scene's per-band mean and standard deviation
(the pipeline's rescaled overview sample) and sharpness (a few probe tiles): the expert
whose signature (``contract.signature``) is nearest wins, each expert's distance raised by
its ``margin``: how much nearer to it than to the source the source's own sample scenes
come (all but ``adapt.source_allowance`` of them). A scene must stand further from the
source than the source's scenes do before an expert takes it: an expert for a faint shift
(a haze that grows) would otherwise take the bright, low-contrast source scenes that look
like it. The source's signature is the bundle's ``reference.json``.

Why route rather than replace: re-standardising the input towards a new sensor is what
recovers most of a radiometric shift, but applied to source-sensor imagery the same map is
a shift of its own (``benchmarks/adaptation.py`` measures what it costs clean scenes).
A box that sees both sensors, or goes back to the first, needs both experts.
"""

from __future__ import annotations

import numpy as np

from appliance.contract.bundle import Bundle
from appliance.contract.signature import (
    Signature,
    domain_signature,
    radiometric_distance,
    source_signature,
)

Routes = dict[str | None, tuple[Signature, float]]
"""Every path a scene may take (None: the source) with its signature and routing margin."""


def routes(bundle: Bundle) -> Routes:
    """The source's and every expert's signature and margin, as ``bundle`` routes.

    Sharpness counts only when the source's reference has it too (bundles exported before
    it existed do not): every expert is then compared on the same terms."""
    source = source_signature(bundle.reference.bands)
    out: Routes = {None: (source, 0.0)}
    for d in bundle.manifest.experts:
        sig = domain_signature(d)
        out[d.name] = (sig if source[2] is not None else (sig[0], sig[1], None), d.margin)
    return out


def route_among(scene: Signature, paths: Routes) -> str | None:
    """The path whose distance to ``scene``, plus its margin, is smallest (the source on a
    tie)."""
    return nearest({k: radiometric_distance(scene, sig) + margin
                    for k, (sig, margin) in paths.items()})


def source_margin(samples: list[Signature], source: Signature, expert: Signature,
                  allowance: float) -> float:
    """The routing margin of an expert with signature ``expert``: the smallest that leaves
    at most ``allowance`` of the source's sample scenes nearer it than ``source`` (ties go
    to the source; the 1e-9 keeps rounding from tipping one); 0 when no more are."""
    ahead = sorted((radiometric_distance(s, source) - radiometric_distance(s, expert)
                    for s in samples), reverse=True)
    kept = int(np.floor(allowance * len(ahead) + 1e-9))  # samples it may take
    return max(0.0, ahead[kept] + 1e-9) if kept < len(ahead) else 0.0


def nearest(scores: dict[str | None, float]) -> str | None:
    """The expert with the smallest distance; the source on a tie."""
    return min(scores, key=lambda name: (scores[name], name is not None))


def route(bundle: Bundle, scene: Signature) -> str | None:
    """The expert (domain name, or None for the source) for a scene's signature."""
    if not bundle.manifest.experts:
        return None
    return route_among(scene, routes(bundle))
