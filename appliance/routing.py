"""Routing a scene to the expert of its domain by its radiometry.

A bundle adapted in the field holds more than one expert (``bundle.Domain``): the source
model and one calibrated to the sensor the box drifted to. Which one classifies a scene is
decided before any tile is read, from the scene's per-band mean and standard deviation
(the pipeline's rescaled overview sample): the expert whose signature is nearest in
``radiometric_distance`` wins. The source's signature is the bundle's ``reference.json``.

Why route rather than replace: re-standardising the input towards a new sensor is what
recovers most of a radiometric shift, but applied to source-sensor imagery the same map is
a shift of its own (measured on AID: −15 points on clean images when calibrated fully).
A box that sees both sensors, or goes back to the first, needs both experts.
"""

from __future__ import annotations

import numpy as np

from appliance.bundle import BandStats, Bundle


def radiometric_distance(mean: np.ndarray, std: np.ndarray, ref_mean: np.ndarray,
                         ref_std: np.ndarray) -> float:
    """Mean over bands of ``|Δmean| / σ_ref + |log(σ / σ_ref)|``: 0 for equal moments.

    Offsets count in units of the reference spread and contrast changes as log ratios, so a
    gain of 2 weighs like an offset of 0.7σ whatever the band's range.
    """
    sd_r = np.maximum(np.asarray(ref_std, np.float64), 1e-9)
    sd = np.maximum(np.asarray(std, np.float64), 1e-9)
    return float(np.mean(np.abs(np.asarray(mean) - np.asarray(ref_mean)) / sd_r
                         + np.abs(np.log(sd / sd_r))))


def band_moments(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and standard deviation of [p,C] pixels (model value range)."""
    px = np.asarray(pixels, np.float64)
    return px.mean(axis=0), px.std(axis=0)


def source_signature(bands: list[BandStats]) -> tuple[np.ndarray, np.ndarray]:
    """The source's per-band mean and std from ``reference.json``."""
    return np.array([b.mean for b in bands]), np.array([b.std for b in bands])


def distances(bundle: Bundle, mean: np.ndarray, std: np.ndarray) -> dict[str | None, float]:
    """Radiometric distance of moments to every expert of ``bundle`` (None: the source)."""
    out: dict[str | None, float] = {
        None: radiometric_distance(mean, std, *source_signature(bundle.reference.bands))}
    for d in bundle.manifest.domains:
        out[d.name] = radiometric_distance(mean, std, np.asarray(d.mean), np.asarray(d.std))
    return out


def nearest(scores: dict[str | None, float]) -> str | None:
    """The expert with the smallest distance; the source on a tie."""
    return min(scores, key=lambda name: (scores[name], name is not None))


def route(bundle: Bundle, pixels: np.ndarray) -> str | None:
    """The expert (domain name, or None for the source) for a scene's [p,C] pixel sample."""
    if not bundle.manifest.domains or len(pixels) == 0:
        return None
    return nearest(distances(bundle, *band_moments(pixels)))

