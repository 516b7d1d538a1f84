"""Affine maps that bring a new domain towards the source statistics, per dimension.

Two places take the same blended re-standardisation: the backbone features (``Alignment``,
folded into the source head to make the head step's teacher) and the scene values per band
(``InputAlignment``, folded into a new expert's input spec). The target statistics are
*blended* with the source ones (``adapt.blend``, ``adapt.input_blend``) rather than used
alone: a full reset on the few target samples a box holds overshoots.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from appliance.contract.bundle import BandStats, InputSpec
from appliance.contract.signature import radiometric_distance, source_signature


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
