"""Adaptation of a multi-label (sigmoid) bundle: refused with its reason, never a softmax head.

The stream is shifted (the blue colour cast that a single-label colour bundle adapts to, see
test_adapter.py) and large enough for a job; the multi-label bundle's job must refuse, say
why, propose nothing and leave every file of the model as it was.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.adapt.adapter import MULTI_LABEL_REFUSAL, Adapter
from appliance.config import AdaptConfig
from appliance.contract.bundle import CLASSIFIER, load_bundle
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.model.store import ModelStore
from tests.helpers.adaptation import HEAD_ONLY, TILING, apply, fill
from tests.helpers.colour_bundle import build_colour_bundle


@pytest.fixture()
def ml_store(tmp_path: Path) -> ModelStore:
    models = ModelStore(tmp_path / "state" / "models")
    models.install(build_colour_bundle(tmp_path / "ml", multi_label=True))
    return models


@pytest.mark.parametrize("cfg", [HEAD_ONLY, AdaptConfig(min_samples=20, store_max_cells=1000,
                                                        cooldown_scenes=2)],
                         ids=["head-step", "input-and-head-steps"])
def test_multi_label_job_refuses_and_promotes_nothing(ml_store: ModelStore, tmp_path: Path,
                                                      cfg: AdaptConfig) -> None:
    active = ml_store.active()
    runtime = ModelRuntime(active, ProviderPlan(providers=("cpu",)))
    adapter = Adapter(ml_store, cfg, tmp_path / "state", TILING)
    fill(adapter, runtime, scenes=8)  # a shifted stream, enough cells for a job
    assert adapter.due(drifting=True, bundle=active)  # a drift-started job would run
    head_before = active.file(CLASSIFIER).read_bytes()
    report = adapter.run(active, "drift")
    assert report.action == "skipped" and not report.promoted
    assert report.message == MULTI_LABEL_REFUSAL and "multi-label" in report.message
    assert report.candidate is None and report.gate is None and report.rounds == []
    done = apply(ml_store, report)  # what the daemon does with it
    assert not done.model_changed and done.version_after is None
    assert [v.version for v in ml_store.versions()] == [1]
    assert ml_store.active().file(CLASSIFIER).read_bytes() == head_before
    assert load_bundle(ml_store.active().path).manifest.task == "multi-label"
    assert not list((tmp_path / "state" / "adapt" / "rejected").glob("*"))
