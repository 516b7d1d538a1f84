"""Label-free drift detection on colour-bundle streams: clean, shifted, one odd scene."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from appliance.adapt.adapter import Adapter
from appliance.adapt.drift import DriftMonitor, PageHinkley, mmd2, psi
from appliance.adapt.lineage import DOMAIN
from appliance.config import AdaptConfig, DriftConfig
from appliance.contract.bundle import REFERENCE, Bundle, load_bundle, seal_bundle
from appliance.contract.payloads import DriftStatus
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.model.store import ModelStore
from tests.helpers.adaptation import TILING, fill
from tests.helpers.colour_scenes import BLUE_CAST, colour_scene

# The colour bundle's reference holds one pixel per source colour, so clean synthetic
# scenes (with pixel noise) already sit near PSI 0.2; thresholds are set for this world.
CFG = DriftConfig(psi_threshold=1.0, feature_threshold=0.05, window=5, min_scenes=3)


@pytest.fixture(scope="module")
def runtime(colour_bundle: Path) -> ModelRuntime:
    return ModelRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cpu",)))


def _monitor(colour_bundle: Path, state: Path, cfg: DriftConfig = CFG) -> DriftMonitor:
    return DriftMonitor(load_bundle(colour_bundle).reference, cfg, state)


def test_clean_stream_never_drifts(runtime: ModelRuntime, colour_bundle: Path,
                                   tmp_path: Path) -> None:
    monitor = _monitor(colour_bundle, tmp_path)
    reports = [monitor.observe(colour_scene(runtime, seed)[0]) for seed in range(12)]
    assert not any(r.drifting for r in reports)
    assert all(r.fired == [] for r in reports)
    assert reports[-1].window.scenes == CFG.window


def test_shifted_stream_drifts_on_every_signal(runtime: ModelRuntime, colour_bundle: Path,
                                               tmp_path: Path) -> None:
    monitor = _monitor(colour_bundle, tmp_path)
    for seed in range(5):
        assert not monitor.observe(colour_scene(runtime, seed)[0]).drifting
    reports = [monitor.observe(colour_scene(runtime, 100 + s, BLUE_CAST)[0]) for s in range(10)]
    assert not reports[0].drifting, "one shifted scene must not fire"
    assert reports[-1].drifting
    assert set(reports[-1].fired) == {"radiometry", "features", "confidence"}
    scene = reports[-1].scene
    assert scene is not None and scene.psi > CFG.psi_threshold
    assert scene.psi_bands[2] == max(scene.psi_bands) and scene.mmd > CFG.feature_threshold
    assert reports[-1].as_dict()["scene"]["psi"] == scene.psi


def test_one_odd_scene_does_not_fire(runtime: ModelRuntime, colour_bundle: Path,
                                     tmp_path: Path) -> None:
    monitor = _monitor(colour_bundle, tmp_path)
    seeds = [0, 1, 2, 3, 200, 4, 5, 6]
    reports = [monitor.observe(colour_scene(runtime, s, BLUE_CAST if s == 200 else (0, 0, 0))[0])
               for s in seeds]
    assert reports[4].scene.psi > CFG.psi_threshold  # the odd scene itself scores high
    assert not any(r.drifting for r in reports)
    assert all("radiometry" not in r.fired for r in reports)


def test_state_survives_a_restart(runtime: ModelRuntime, colour_bundle: Path,
                                  tmp_path: Path) -> None:
    first = _monitor(colour_bundle, tmp_path)
    for s in range(4):
        first.observe(colour_scene(runtime, 100 + s, BLUE_CAST)[0])
    before = first.status()
    second = _monitor(colour_bundle, tmp_path)
    assert second.status() == before and isinstance(before, DriftStatus)
    assert not before.adapting  # the caller's to set
    report = second.observe(colour_scene(runtime, 104, BLUE_CAST)[0])
    assert report.window.scenes == 5 and report.scenes_seen == 5
    assert report.drifting


def _another_model(colour_bundle: Path, out: Path) -> Bundle:
    """The colour bundle with another source reference (a different model)."""
    shutil.copytree(colour_bundle, out)
    bundle = load_bundle(out)
    bands = [b.model_copy(update={"mean": b.mean + 10}) for b in bundle.reference.bands]
    reference = bundle.reference.model_copy(update={"bands": bands})
    (out / REFERENCE).write_text(reference.model_dump_json(by_alias=True))
    seal_bundle(out, bundle.manifest)
    return load_bundle(out)


def test_switch_to_an_adapted_version_restarts_only_the_confidence_detectors(
        runtime: ModelRuntime, colour_bundle: Path, tmp_path: Path) -> None:
    monitor = _monitor(colour_bundle, tmp_path / "drift")
    for s in range(4):
        monitor.observe(colour_scene(runtime, 100 + s, BLUE_CAST)[0])
    assert monitor.status().window.ph_max_prob > 0
    store = ModelStore(tmp_path / "state" / "models")
    store.install(colour_bundle)
    adapter = Adapter(store, AdaptConfig(min_samples=20, input_blend=1.0), tmp_path / "state",
                      TILING)
    fill(adapter, runtime)
    candidate = adapter.run(store.active(), "drift").candidate
    assert candidate is not None
    monitor.switch_model(load_bundle(Path(candidate)))  # same source reference, one expert more
    status = monitor.status()
    assert status.window.scenes == 4  # the imagery seen is still what it was
    assert status.window.ph_max_prob == 0 and status.window.ph_entropy == 0
    assert _monitor(colour_bundle, tmp_path / "drift").status() == status  # persisted
    expert = ModelRuntime(load_bundle(Path(candidate)), ProviderPlan(providers=("cpu",)))
    report = monitor.observe(colour_scene(expert, 500, BLUE_CAST)[0])
    assert report.scene is not None and report.scene.reference == DOMAIN


def test_switch_to_another_model_forgets_the_window_and_the_detectors(
        runtime: ModelRuntime, colour_bundle: Path, tmp_path: Path) -> None:
    monitor = _monitor(colour_bundle, tmp_path / "drift")
    for s in range(5):
        monitor.observe(colour_scene(runtime, 100 + s, BLUE_CAST)[0])
    assert monitor.status().drifting
    monitor.switch_model(_another_model(colour_bundle, tmp_path / "other"))
    status = monitor.status()
    assert status.window.scenes == 0 and not status.drifting and status.fired == []
    assert _monitor(colour_bundle, tmp_path / "drift").status().window.scenes == 0


def test_scene_without_valid_cells_is_skipped(runtime: ModelRuntime, colour_bundle: Path,
                                              tmp_path: Path) -> None:
    cells, _ = colour_scene(runtime, 0)
    empty = type(cells)(**{**cells.__dict__, "valid": np.zeros(len(cells), bool)})
    report = _monitor(colour_bundle, tmp_path).observe(empty)
    assert report.skipped == "no valid cells" and not report.drifting
    assert report.scene is None and report.window.scenes == 0


def test_statistics() -> None:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=20_000)
    edges = np.percentile(ref, np.arange(10, 100, 10))
    assert psi(edges, rng.normal(size=5000)) < 0.02
    assert psi(edges, rng.normal(1.0, 1.0, size=5000)) > 0.25
    x = rng.normal(size=(200, 4))
    assert abs(mmd2(x, rng.normal(size=(300, 4)), 2.0)) < 0.02
    assert mmd2(x, rng.normal(2.0, 1.0, size=(300, 4)), 2.0) > 0.3
    ph = PageHinkley(delta=0.05, threshold=0.5)
    for _ in range(20):
        ph.update(0.04)
    assert not ph.fired
    for _ in range(3):
        ph.update(0.2)
    assert not ph.fired  # 3 × 0.15 = 0.45 ≤ 0.5
    ph.update(0.2)
    assert ph.fired and ph.statistic == pytest.approx(0.6)


def test_scenes_routed_to_an_expert_are_judged_against_its_domain(
        runtime: ModelRuntime, colour_bundle: Path, tmp_path: Path) -> None:
    """After adaptation the cast stream is what the expert expects: scored against the
    expert's reference, not the source's."""
    store = ModelStore(tmp_path / "state" / "models")
    store.install(colour_bundle)
    adapter = Adapter(store, AdaptConfig(min_samples=20, input_blend=1.0), tmp_path / "state",
                      TILING)
    fill(adapter, runtime)
    report = adapter.run(store.active(), "drift")
    assert report.step == "input" and report.candidate is not None
    adapted = load_bundle(Path(report.candidate))
    expert = ModelRuntime(adapted, ProviderPlan(providers=("cpu",)))
    aware = DriftMonitor(adapted.reference, CFG, tmp_path / "aware",
                         adapted.expert_references())
    blind = DriftMonitor(adapted.reference, CFG, tmp_path / "blind")
    for seed in range(10):
        cells = colour_scene(expert, 500 + seed, BLUE_CAST)[0]
        assert cells.domain == DOMAIN
        judged, unaware = aware.observe(cells), blind.observe(cells)
    assert judged.scene.reference == DOMAIN and unaware.scene.reference is None
    # The cast is the expert's normal: its radiometry is scored far closer to home. (The
    # colour world's clipped, few-colour bands keep PSI itself high on both sides.)
    assert judged.window.psi < 0.6 * unaware.window.psi, (judged.window, unaware.window)
    # Clean scenes still go to the source model and its reference.
    clean = aware.observe(colour_scene(expert, 600)[0])
    assert clean.scene.reference is None
