"""A domain's radiometric signature: per-band moments and sharpness, and their distance.

What the workstation and the box agree on when they describe imagery: the exporter writes
the source's signature into ``reference.json`` (with the training chips' sharpness), the box
measures each scene's and each adapted expert's the same way, and routing compares them.
"""

from __future__ import annotations

import numpy as np

from appliance.contract.bundle import BandStats, Expert, SceneSample

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


def domain_signature(domain: Expert) -> Signature:
    """An adapted expert's signature from the manifest."""
    return (np.asarray(domain.mean), np.asarray(domain.std),
            None if domain.sharpness is None else np.asarray(domain.sharpness))


def sample_signature(sample: SceneSample, sharp: bool) -> Signature:
    """A source sample scene's signature (``Reference.scenes``), with its sharpness or not,
    to compare like with like."""
    return (np.asarray(sample.mean), np.asarray(sample.std),
            np.asarray(sample.sharpness) if sharp else None)


def scene_signature(pixels: np.ndarray, tiles: np.ndarray | None = None) -> Signature:
    """A scene's signature from its [p,C] pixel sample and, for the sharpness term, a few
    of its model-input tiles [n,C,H,W]."""
    mean, std = band_moments(pixels)
    return mean, std, sharpness(tiles) if tiles is not None and len(tiles) else None
