"""Fixtures of the adaptation tests: a model store seeded with the colour bundle, its runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.contract.bundle import load_bundle
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.model.store import ModelStore


@pytest.fixture()
def store(colour_bundle: Path, tmp_path: Path) -> ModelStore:
    models = ModelStore(tmp_path / "state" / "models")
    models.install(colour_bundle)
    return models


@pytest.fixture(scope="module")
def runtime(colour_bundle: Path) -> ModelRuntime:
    return ModelRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cpu",)))
