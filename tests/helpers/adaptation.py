"""Driving an ``Adapter`` in tests: fill its candidate store from colour scenes, and apply
its reports as the model host does (the adapter itself only proposes)."""

from __future__ import annotations

from pathlib import Path

from appliance.adapt.adapter import Adapter
from appliance.config import AdaptConfig, TilingConfig
from appliance.contract.payloads import AdaptationReport
from appliance.model.runtime import ModelRuntime
from appliance.model.store import ModelStore
from tests.helpers.colour_scenes import BLUE_CAST, colour_scene

TILING = TilingConfig(scales=[16, 32])  # the colour bundle's scales, the pipeline's default rule

# Head-step tests switch the input step off; the input step's own tests switch it on.
HEAD_ONLY = AdaptConfig(min_samples=20, store_max_cells=1000, cooldown_scenes=2, input_blend=0)


def fill(adapter: Adapter, runtime: ModelRuntime, scenes: int = 6,
         cast: tuple[float, float, float] = BLUE_CAST, start: int = 300) -> None:
    """Collect ``scenes`` colour scenes classified by ``runtime`` (seeds from ``start``)."""
    for seed in range(start, start + scenes):
        adapter.collect(colour_scene(runtime, seed, cast)[0], runtime.bundle)


def apply(store: ModelStore, report: AdaptationReport, keep_versions: int = 20
          ) -> AdaptationReport:
    """Install and activate a promoted candidate (then prune), or activate ``reset_to``;
    the report with ``version_after`` and ``bundle_path`` filled."""
    if report.promoted:
        assert report.candidate is not None, report
        bundle = store.install(Path(report.candidate), activate=True)
        store.prune(keep_versions)
    elif report.action == "reset":
        assert report.reset_to is not None, report
        bundle = store.activate(report.reset_to)
    else:
        return report
    return report.model_copy(update={"version_after": bundle.version,
                                     "bundle_path": str(bundle.path)})
