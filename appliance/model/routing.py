"""Routing a scene to the expert of its domain by its radiometry.

A bundle adapted in the field holds more than one expert (``bundle.Expert``): the source
model and one calibrated to the sensor the box drifted to. Which one classifies a scene is
decided before any tile is read, from the scene's per-band mean and standard deviation
(the pipeline's rescaled overview sample) and sharpness (a few probe tiles): the expert
whose signature (``contract.signature``) is nearest wins. The source's signature is the
bundle's ``reference.json``.

Why route rather than replace: re-standardising the input towards a new sensor is what
recovers most of a radiometric shift, but applied to source-sensor imagery the same map is
a shift of its own (``benchmarks/adaptation.py`` measures what it costs clean scenes).
A box that sees both sensors, or goes back to the first, needs both experts.
"""

from __future__ import annotations

from appliance.contract.bundle import Bundle
from appliance.contract.signature import (
    Signature,
    domain_signature,
    radiometric_distance,
    source_signature,
)


def distances(bundle: Bundle, scene: Signature) -> dict[str | None, float]:
    """Radiometric distance of a scene's signature to every expert of ``bundle``.

    Sharpness counts only when the source's reference has it too (bundles exported before
    it existed do not): every expert is then compared on the same terms."""
    source = source_signature(bundle.reference.bands)
    if source[2] is None:
        scene = (scene[0], scene[1], None)
    out: dict[str | None, float] = {None: radiometric_distance(scene, source)}
    for d in bundle.manifest.experts:
        out[d.name] = radiometric_distance(scene, domain_signature(d))
    return out


def nearest(scores: dict[str | None, float]) -> str | None:
    """The expert with the smallest distance; the source on a tie."""
    return min(scores, key=lambda name: (scores[name], name is not None))


def route(bundle: Bundle, scene: Signature) -> str | None:
    """The expert (domain name, or None for the source) for a scene's signature."""
    if not bundle.manifest.experts:
        return None
    return nearest(distances(bundle, scene))
