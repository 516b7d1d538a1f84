"""Driving an ``Adapter`` in tests: fill its candidate store from colour scenes, and apply
its reports as the model host does (the adapter itself only proposes)."""

from __future__ import annotations

from appliance.adapt.adapter import Adapter
from appliance.adapt.job import stage, switch
from appliance.config import AdaptConfig, Settings, TilingConfig
from appliance.contract.payloads import AdaptationReport
from appliance.model.host import ModelHost
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
    """What the daemon does with a job's report, through the same code: the model host
    (without sessions) installs a promoted candidate, or activates ``reset_to``."""
    host = ModelHost(store, Settings(model={"warmup": False}, mqtt={"enabled": False}),
                     serve=False)
    staged, report = stage(host, report)
    return switch(host, report, staged, keep_versions)
