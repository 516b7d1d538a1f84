"""Per-scene candidate collection: which of a scene's cells adaptation may learn from.

After every scene the sampled valid cells go to the ``CandidateStore`` under the input key
of the expert the scene was routed to (``expert_key``), so a job adapting one expert learns
only from features computed the way it computes them. Cells that look like cloud
(``cloud_like``) are never stored. The bundle is the one that classified the scene, handed
in by its caller; its expert keys are derived from its manifest alone (no file is read).
"""

from __future__ import annotations

import numpy as np

from appliance.adapt.candidates import CandidateStore, expert_key
from appliance.adapt.lineage import adapted_domain
from appliance.config import AdaptConfig
from appliance.contract.bundle import Bundle
from appliance.scene.cells import SceneCells


def cloud_like(band_means: np.ndarray, value_range: tuple[float, float], brightness: float,
               spread: float) -> np.ndarray:
    """Cells [n] whose every band is at least ``brightness`` of the value range and whose
    bands differ by at most ``spread`` of it: thick cloud, haze banks, saturated snow.

    A radiometric screen for pseudo-labels, not a cloud mask: without SWIR or thermal
    bands a white roof passes too, and thin cirrus does not. A cell it drops is only
    never learnt from; it is still classified.
    """
    lo, hi = value_range
    x = (np.asarray(band_means, np.float64) - lo) / max(hi - lo, 1e-9)
    return np.asarray((x.min(axis=1) >= brightness)
                      & (x.max(axis=1) - x.min(axis=1) <= spread))


class CandidateCollector:
    """Stores each scene's usable cells under its expert's key."""

    def __init__(self, store: CandidateStore, cfg: AdaptConfig) -> None:
        self.store = store
        self.cfg = cfg

    def collect(self, cells: SceneCells, bundle: Bundle) -> int:
        """Keep a scene's sampled valid cells as candidates, never nodata nor cloud-like
        ones; returns the count. ``bundle`` is the one that classified the scene."""
        if len(cells.sample_index) == 0 or len(cells.band_sample) == 0:
            return 0
        valid = cells.valid[cells.sample_index]
        if cells.band_means is not None:
            valid &= ~cloud_like(cells.band_means[cells.sample_index],
                                 bundle.manifest.input.value_range, self.cfg.cloud_brightness,
                                 self.cfg.cloud_spread)
        feats = cells.sample_features[valid]
        probs = cells.probs[cells.sample_index][valid]
        return self.store.add(cells.scene_id, feats, probs, cells.band_sample,
                              self.key(bundle, cells.domain), cells.sample_tiles,
                              cells.sharpness)

    @staticmethod
    def key(bundle: Bundle, domain: str | None) -> str:
        """Input key of an expert of ``bundle`` (None: the source model's; "" for a name
        the bundle does not have)."""
        if domain is not None and domain not in {d.name for d in bundle.manifest.experts}:
            return ""
        return expert_key(bundle, domain)

    @staticmethod
    def adapted_key(bundle: Bundle) -> str:
        """Input key of the expert the next job on ``bundle`` adapts."""
        return expert_key(bundle, adapted_domain(bundle))
