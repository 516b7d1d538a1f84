"""Ground sampling distance: a scene's, the bundle's, and windows that cover the right ground.

A model trained on 0.5–8 m chips sees a 224 px window of a 300 m scene as 67 km of ground
it has never seen at that scale; nothing in the pixels says so. The bundle records the
GSD of its training chips (``manifest.gsd``, metres, null when unknown) and each scene's
GSD is measured from its geotransform at the scene centre (``contract.gsd.scene_gsd``).

``plan_windows`` turns the configured tiling into scene pixels:

- ``tiling.units: metres``: every window covers that ground extent (resampled to the
  model input as any window is), like TorchGeo's samplers in CRS units;
- ``pixels`` with the bundle's scales and both GSDs known (``tiling.match_gsd``): windows
  scaled by ``bundle GSD / scene GSD`` so each covers the ground it covered in training;
- otherwise the pixel scales as they are.

Then the ground extent of the windows is compared with the training one; a factor
beyond ``input.gsd_tolerance`` either way is a warning (log, result ``warnings``,
summary, STAC) or, with ``input.gsd_policy: refuse``, ``SceneError("resolution")``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from appliance.config import InputConfig, ResolvedTiling, TilingConfig
from appliance.scene.raster import SceneError

log = logging.getLogger(__name__)

MIN_WINDOW_PX = 8  # a matched window smaller than this holds too little to classify


@dataclass(frozen=True)
class WindowPlan:
    """The windows a scene is tiled with, in scene pixels, and how they relate to training."""

    tiling: ResolvedTiling
    scene_gsd: float | None
    bundle_gsd: float | None
    matched: bool  # windows were scaled to the scene's GSD (metres or GSD matching)
    ratio: float | None  # window ground extent / training ground extent (middle scales)
    warnings: list[str] = field(default_factory=list)


def _middle(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def plan_windows(tiling: TilingConfig, cfg: InputConfig, bundle_scales: list[int],
                 bundle_gsd: float | None, gsd: float | None, name: str) -> WindowPlan:
    """The scene-pixel tiling for a scene of ``gsd`` m; ``SceneError("resolution")`` when
    its windows are too far from the training extent and ``input.gsd_policy`` refuses."""
    warnings: list[str] = []
    pixels: list[int] | None = None
    cell: int | None = None
    if tiling.units == "metres":
        metres = tiling.scales or (
            [s * bundle_gsd for s in bundle_scales] if bundle_gsd is not None else None)
        if metres is None or gsd is None:
            warnings.append(f"{name}: tiling.units is metres but "
                            + ("the scene's GSD is unknown" if gsd is None else
                               "tiling.scales is unset and the bundle records no GSD")
                            + f": tiled with the bundle's {bundle_scales} px windows")
        else:
            pixels = [max(1, round(m / gsd)) for m in metres]
            cell = max(1, round(tiling.cell / gsd)) if tiling.cell else None
    elif (tiling.scales is None and tiling.match_gsd and gsd is not None
          and bundle_gsd is not None):
        factor = bundle_gsd / gsd
        scaled = [round(s * factor) for s in bundle_scales]
        if min(scaled) >= MIN_WINDOW_PX:
            pixels = scaled
            cell = round(tiling.cell * factor) if tiling.cell else None
        else:
            warnings.append(f"{name}: at {gsd:.3g} m per pixel the bundle's windows "
                            f"({bundle_scales} px at {bundle_gsd:.3g} m) would be "
                            f"{scaled} px, too few to classify: not matched")
    resolved = tiling.for_bundle(bundle_scales, pixels, cell)
    ratio = None
    if gsd is not None and bundle_gsd is not None:
        ratio = (_middle([float(s) for s in resolved.scales]) * gsd
                 / (_middle([float(s) for s in bundle_scales]) * bundle_gsd))
        if max(ratio, 1 / ratio) > cfg.gsd_tolerance:
            message = (f"{name}: windows cover {ratio:.3g}x the ground the model was trained "
                       f"on (scene {gsd:.3g} m per pixel, bundle {bundle_gsd:.3g} m, "
                       f"input.gsd_tolerance {cfg.gsd_tolerance:g}); results are unreliable: "
                       "set tiling.units: metres with tiling.scales, or use a bundle trained "
                       "at this resolution")
            if cfg.gsd_policy == "refuse":
                raise SceneError("resolution", message)
            warnings.append(message)
    for w in warnings:
        log.warning("%s", w)
    return WindowPlan(resolved, gsd, bundle_gsd, pixels is not None, ratio, warnings)
