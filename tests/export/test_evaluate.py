"""``terratile-export evaluate`` on a bundle adapted on a box: routed like the box, or one path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.adapt.adapter import Adapter
from appliance.adapt.lineage import DOMAIN
from appliance.config import AdaptConfig
from appliance.contract.bundle import load_bundle
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.model.store import ModelStore
from export.cli import app
from tests.helpers.adaptation import TILING, fill
from tests.helpers.colour_scenes import BLUE_CAST
from tests.helpers.torch_bundle import write_colour_chips

runner = CliRunner()
INPUT_STEP = AdaptConfig(min_samples=20, store_max_cells=1000, cooldown_scenes=2)


@pytest.fixture(scope="module")
def adapted(colour_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The colour bundle with an expert for the blue-cast sensor, made by a real input step."""
    state = tmp_path_factory.mktemp("adapted") / "state"
    store = ModelStore(state / "models")
    store.install(colour_bundle)
    adapter = Adapter(store, INPUT_STEP, state, TILING)
    fill(adapter, ModelRuntime(store.active(), ProviderPlan(providers=("cpu",))))
    report = adapter.run(store.active(), "drift")
    assert report.candidate is not None and report.step == "input", report.as_dict()
    return store.install(Path(report.candidate)).path


def _evaluate(bundle: Path, data: Path, *extra: str) -> dict[str, object]:
    r = runner.invoke(app, ["evaluate", "--bundle", str(bundle), "--data", str(data), "--json",
                            *extra])
    assert r.exit_code == 0, r.output
    out: dict[str, object] = json.loads(r.stdout)
    return out


def test_shifted_chips_are_measured_on_the_expert_they_route_to(adapted: Path,
                                                                tmp_path: Path) -> None:
    cast = write_colour_chips(tmp_path / "cast", per_class=8, cast=BLUE_CAST)
    routed = _evaluate(adapted, cast)
    source = _evaluate(adapted, cast, "--expert", "source")
    forced = _evaluate(adapted, cast, "--expert", DOMAIN)
    assert routed["routing"] == {"mode": "folder", "groups": 1, "chips": {DOMAIN: 24}}
    assert source["routing"] == {"mode": "expert", "groups": 1, "chips": {"source": 24}}
    assert forced["overall_accuracy"] == routed["overall_accuracy"]
    assert routed["overall_accuracy"] > source["overall_accuracy"] + 0.1  # type: ignore[operator]


def test_clean_chips_route_to_the_source_model(adapted: Path, tmp_path: Path) -> None:
    clean = write_colour_chips(tmp_path / "clean", per_class=8)
    routed = _evaluate(adapted, clean, "--route-chips", "6")
    assert routed["routing"] == {"mode": "chips", "groups": 4, "chips": {"source": 24}}
    plain = _evaluate(load_bundle(adapted).path, clean, "--expert", "source")
    assert routed["overall_accuracy"] == plain["overall_accuracy"]


def test_an_unknown_expert_is_refused(adapted: Path, tmp_path: Path) -> None:
    clean = write_colour_chips(tmp_path / "clean", per_class=2)
    r = runner.invoke(app, ["evaluate", "--bundle", str(adapted), "--data", str(clean),
                            "--expert", "nope"])
    assert r.exit_code == 2 and "no domain 'nope'" in r.output
