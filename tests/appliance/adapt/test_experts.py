"""Several experts on one box: a second sensor, a domain that moves on, idle experts, rollback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from appliance.adapt.adapter import Adapter
from appliance.adapt.lineage import DOMAIN
from appliance.config import Settings
from appliance.contract.bundle import Bundle
from appliance.model.host import ModelHost
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.model.store import ModelStore
from tests.helpers.adaptation import HEAD_ONLY, TILING, apply, fill
from tests.helpers.colour_scenes import BLUE_CAST, colour_scene

CPU = ProviderPlan(providers=("cpu",))
CFG = HEAD_ONLY.model_copy(update={"input_blend": 1.0})
GREEN_CAST = (-60.0, 100.0, -20.0)
SECOND = f"{DOMAIN}-2"


def _experts(bundle: Bundle) -> list[str]:
    return [d.name for d in bundle.manifest.experts]


def _first_expert(store: ModelStore, runtime: ModelRuntime, adapter: Adapter) -> Bundle:
    fill(adapter, runtime)
    report = apply(store, adapter.run(store.active(), "drift"))
    assert report.promoted and report.step == "input", report.as_dict()
    assert _experts(store.active()) == [DOMAIN]
    return store.active()


def _files(bundle: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(bundle.iterdir()) if p.is_file()}


def test_a_second_domain_gets_a_second_expert_while_the_first_keeps_its_scenes(
        store: ModelStore, runtime: ModelRuntime, tmp_path: Path) -> None:
    adapter = Adapter(store, CFG, tmp_path / "state", TILING)
    first = _first_expert(store, runtime, adapter)
    serving = ModelRuntime(first, CPU)
    blue_before, truth = colour_scene(serving, 700, BLUE_CAST)
    for seed in range(400, 405):  # the second sensor, interleaved with the first one's scenes
        adapter.collect(colour_scene(serving, seed, GREEN_CAST)[0], first)
        adapter.collect(colour_scene(serving, seed + 50, BLUE_CAST)[0], first)
    report = apply(store, adapter.run(first, "drift"))
    assert (report.step, report.domain, report.action) == ("input", SECOND, "promoted"), \
        report.as_dict()
    assert not report.replaced and report.counts is not None
    second = store.active()
    assert _experts(second) == [DOMAIN, SECOND] and second.manifest.parent == first.version
    routed = ModelRuntime(second, CPU)
    blue_after, _ = colour_scene(routed, 700, BLUE_CAST)
    green, green_truth = colour_scene(routed, 701, GREEN_CAST)
    green_source, _ = colour_scene(ModelRuntime(store.load(1), CPU), 701, GREEN_CAST)
    clean, _ = colour_scene(routed, 702)
    assert blue_after.domain == DOMAIN and green.domain == SECOND and clean.domain is None
    np.testing.assert_array_equal(blue_after.probs, blue_before.probs)  # first expert as it was
    assert second.classifier(DOMAIN).read_bytes() == first.classifier(DOMAIN).read_bytes()
    assert (green.labels == green_truth).mean() > (green_source.labels == green_truth).mean()
    assert (blue_after.labels == truth).mean() > 0.9


def test_a_second_domains_job_is_due_on_its_source_routed_cells(
        store: ModelStore, runtime: ModelRuntime, tmp_path: Path) -> None:
    """A new sensor's scenes route to the source, so its cells are stored under the
    source key, not the first expert's: drift with them makes a job due after the cooldown
    instead of waiting for cells under the newest expert's key."""
    adapter = Adapter(store, CFG, tmp_path / "state", TILING)
    first = _first_expert(store, runtime, adapter)
    serving = ModelRuntime(first, CPU)
    adapter.collect(colour_scene(serving, 400, GREEN_CAST)[0], first)
    assert not adapter.due(drifting=True, bundle=first)  # cooling down
    adapter.collect(colour_scene(serving, 401, GREEN_CAST)[0], first)
    assert adapter.candidates.count(adapter.collector.adapted_key(first)) == 0
    assert adapter.due(drifting=True, bundle=first)


def test_the_same_domain_again_gets_no_second_expert(
        store: ModelStore, runtime: ModelRuntime, tmp_path: Path) -> None:
    adapter = Adapter(store, CFG, tmp_path / "state", TILING)
    first = _first_expert(store, runtime, adapter)
    # 5 more of its scenes: 11 stored, under the 2 × 6 that would make it again
    fill(adapter, ModelRuntime(first, CPU), scenes=5, start=500)
    report = adapter.run(first, "drift")
    assert report.step == "head" and report.refused_input is None, report.as_dict()


def test_no_expert_beyond_max_experts(store: ModelStore, runtime: ModelRuntime,
                                      tmp_path: Path) -> None:
    adapter = Adapter(store, CFG.model_copy(update={"max_experts": 1}), tmp_path / "state",
                      TILING)
    first = _first_expert(store, runtime, adapter)
    fill(adapter, ModelRuntime(first, CPU), scenes=6, cast=GREEN_CAST, start=400)
    report = adapter.run(first, "drift")
    assert report.step == "head" and report.refused_input is None
    assert _experts(store.active()) == [DOMAIN]


def test_a_domain_that_moved_on_replaces_its_expert(
        store: ModelStore, runtime: ModelRuntime, tmp_path: Path) -> None:
    """A gradual shift: a mild cast gets an expert; when only a stronger cast arrives, the
    new expert takes the first one's name and place instead of becoming a second one."""
    adapter = Adapter(store, CFG, tmp_path / "state", TILING)
    mild = tuple(0.5 * c for c in BLUE_CAST)
    fill(adapter, runtime, cast=mild)  # type: ignore[arg-type]
    assert apply(store, adapter.run(store.active(), "drift")).promoted
    first = store.active()
    fill(adapter, ModelRuntime(first, CPU), scenes=6, cast=BLUE_CAST, start=600)
    report = apply(store, adapter.run(first, "drift"))
    assert (report.step, report.domain, report.replaced) == ("input", DOMAIN, True), \
        report.as_dict()
    assert _experts(store.active()) == [DOMAIN]
    assert store.active().manifest.experts[0].mean[2] > first.manifest.experts[0].mean[2] + 20
    assert colour_scene(ModelRuntime(store.active(), CPU), 703, BLUE_CAST)[0].domain == DOMAIN


def test_a_retired_experts_scenes_fall_back_to_the_source(
        store: ModelStore, runtime: ModelRuntime, tmp_path: Path) -> None:
    adapter = Adapter(store, CFG.model_copy(update={"expert_idle_scenes": 4}),
                      tmp_path / "state", TILING)
    first = _first_expert(store, runtime, adapter)
    serving = ModelRuntime(first, CPU)
    fill(adapter, serving, scenes=3, cast=(0.0, 0.0, 0.0), start=800)
    assert not adapter.due(drifting=False, bundle=first)
    assert {u.name: u.idle_scenes for u in adapter.usage.summary(first)} == {
        "source": 0, DOMAIN: 3}
    fill(adapter, serving, scenes=1, cast=(0.0, 0.0, 0.0), start=803)
    assert adapter.due(drifting=False, bundle=first)  # idle: due without drift
    report = apply(store, adapter.run(first, "idle"))
    assert (report.step, report.action, report.retired) == ("retire", "promoted", [DOMAIN])
    retired = store.active()
    assert _experts(retired) == [] and retired.manifest.parent == first.version
    after, _ = colour_scene(ModelRuntime(retired, CPU), 710, BLUE_CAST)
    source, _ = colour_scene(runtime, 710, BLUE_CAST)
    assert after.domain is None
    np.testing.assert_array_equal(after.probs, source.probs)
    assert _experts(store.load(first.version)) == [DOMAIN]  # kept for rollback
    counts = {u.name: u.scenes for u in adapter.usage.summary(first)}
    assert counts == {"source": 10, DOMAIN: 0}  # 6 before the expert, 4 after


def test_a_rolled_back_expert_is_not_retired_again_at_once(
        store: ModelStore, runtime: ModelRuntime, tmp_path: Path) -> None:
    adapter = Adapter(store, CFG.model_copy(update={"expert_idle_scenes": 2}),
                      tmp_path / "state", TILING)
    first = _first_expert(store, runtime, adapter)
    fill(adapter, ModelRuntime(first, CPU), scenes=2, cast=(0.0, 0.0, 0.0), start=800)
    apply(store, adapter.run(first, "idle"))
    retired = store.active()
    fill(adapter, ModelRuntime(retired, CPU), scenes=1, cast=(0.0, 0.0, 0.0), start=810)
    store.activate(first.version)  # the operator rolls back
    fill(adapter, ModelRuntime(first, CPU), scenes=1, cast=(0.0, 0.0, 0.0), start=820)
    assert not adapter.due(drifting=False, bundle=first)
    assert {u.name: u.idle_scenes for u in adapter.usage.summary(first)}[DOMAIN] == 1


def test_rollback_across_an_expert_addition_restores_the_version_byte_for_byte(
        store: ModelStore, runtime: ModelRuntime, tmp_path: Path) -> None:
    adapter = Adapter(store, CFG, tmp_path / "state", TILING)
    first = _first_expert(store, runtime, adapter)
    before = _files(first.path)
    serving = ModelRuntime(first, CPU)
    fill(adapter, serving, scenes=6, cast=GREEN_CAST, start=400)
    assert apply(store, adapter.run(first, "drift")).domain == SECOND
    assert _experts(store.active()) == [DOMAIN, SECOND]
    host = ModelHost(store, Settings(model={"warmup": False}, mqtt={"enabled": False}),
                     serve=False)
    change = host.rollback()
    assert change.bundle.version == first.version == store.active_version()
    assert _files(store.active().path) == before
    assert _experts(store.active()) == [DOMAIN]


@pytest.mark.parametrize("taken", [set(), {DOMAIN}, {DOMAIN, SECOND}])
def test_expert_names_are_never_reused(taken: set[str]) -> None:
    from appliance.adapt.lineage import expert_name

    name = expert_name(taken)
    assert name not in taken and name.startswith(DOMAIN)
