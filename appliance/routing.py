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

from appliance.bundle import BandStats, Bundle, Domain

Signature = tuple[np.ndarray, np.ndarray, np.ndarray | None]
"""Per-band mean, std and (when measured) sharpness of a domain or a scene."""


def radiometric_distance(scene: Signature, ref: Signature) -> float:
    """Mean over bands of ``|Δmean| / σ_ref + |log(σ / σ_ref)| (+ |log(s / s_ref)|)``.

    0 for equal signatures. Offsets count in units of the reference spread and contrast
    changes as log ratios, so a gain of 2 weighs like an offset of 0.7σ whatever the band's
    range. The sharpness term (``sharpness``) counts only when both sides have one: it is
    what tells a blurred or coarser sensor from the source, whose band moments it barely
    changes.
    """
    mean, std, sharp = scene
    ref_mean, ref_std, ref_sharp = ref
    sd_r = np.maximum(np.asarray(ref_std, np.float64), 1e-9)
    sd = np.maximum(np.asarray(std, np.float64), 1e-9)
    per_band = np.abs(np.asarray(mean) - np.asarray(ref_mean)) / sd_r + np.abs(np.log(sd / sd_r))
    if sharp is not None and ref_sharp is not None:
        per_band = per_band + np.abs(np.log(np.maximum(np.asarray(sharp, np.float64), 1e-9)
                                            / np.maximum(np.asarray(ref_sharp), 1e-9)))
    return float(np.mean(per_band))


def sharpness(tiles: np.ndarray) -> np.ndarray:
    """Per band [C] of [n,C,H,W] model-input tiles: the mean absolute difference between
    neighbouring pixels over the band's standard deviation.

    Gains and offsets (another sensor's radiometry, haze) leave it unchanged; blur and a
    coarser ground sampling lower it. Measured on the tiles the network sees (windows
    resized to its input), so the source's value comes from the training chips.
    """
    x = np.asarray(tiles, np.float64)
    grad = 0.5 * (np.abs(np.diff(x, axis=3)).mean(axis=(0, 2, 3))
                  + np.abs(np.diff(x, axis=2)).mean(axis=(0, 2, 3)))
    return np.asarray(grad / np.maximum(x.std(axis=(0, 2, 3)), 1e-9))


def band_moments(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-band mean and standard deviation of [p,C] pixels (model value range)."""
    px = np.asarray(pixels, np.float64)
    return px.mean(axis=0), px.std(axis=0)


def source_signature(bands: list[BandStats]) -> Signature:
    """The source's signature from ``reference.json`` (sharpness only if it was exported)."""
    sharp = [b.sharpness for b in bands]
    return (np.array([b.mean for b in bands]), np.array([b.std for b in bands]),
            None if any(v is None for v in sharp) else np.array(sharp, np.float64))


def domain_signature(domain: Domain) -> Signature:
    """An adapted expert's signature from the manifest."""
    return (np.asarray(domain.mean), np.asarray(domain.std),
            None if domain.sharpness is None else np.asarray(domain.sharpness))


def distances(bundle: Bundle, scene: Signature) -> dict[str | None, float]:
    """Radiometric distance of a scene's signature to every expert of ``bundle``.

    Sharpness counts only when the source's reference has it too (bundles exported before
    it existed do not): every expert is then compared on the same terms."""
    source = source_signature(bundle.reference.bands)
    if source[2] is None:
        scene = (scene[0], scene[1], None)
    out: dict[str | None, float] = {None: radiometric_distance(scene, source)}
    for d in bundle.manifest.domains:
        out[d.name] = radiometric_distance(scene, domain_signature(d))
    return out


def nearest(scores: dict[str | None, float]) -> str | None:
    """The expert with the smallest distance; the source on a tie."""
    return min(scores, key=lambda name: (scores[name], name is not None))


def scene_signature(pixels: np.ndarray, tiles: np.ndarray | None = None) -> Signature:
    """A scene's signature from its [p,C] pixel sample and, for the sharpness term, a few
    of its model-input tiles [n,C,H,W]."""
    mean, std = band_moments(pixels)
    return mean, std, sharpness(tiles) if tiles is not None and len(tiles) else None


def route(bundle: Bundle, scene: Signature) -> str | None:
    """The expert (domain name, or None for the source) for a scene's signature."""
    if not bundle.manifest.domains:
        return None
    return nearest(distances(bundle, scene))

