"""Gated adaptation on the colour bundle: promotion, refusal, reset, crash safety."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio

from appliance.adapt.adapter import (
    DOMAIN,
    Adapter,
    _features,
    cloud_like,
    select_pseudo_labels,
)
from appliance.config import AdaptConfig, Settings
from appliance.contract.bundle import BACKBONE, CLASSIFIER, load_bundle
from appliance.model.head import read_head
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.model.store import ModelStore
from appliance.scene.cells import SceneCells
from appliance.scene.pipeline import process_scene
from tests.conftest import Broker
from tests.helpers.colour_scenes import BLUE_CAST, colour_scene
from tests.helpers.daemon import DaemonProc, P
from tests.helpers.mqtt_listener import Listener, topic_endswith, topic_is
from tests.helpers.paths import REPO
from tests.helpers.scenes import quarters, write_scene

# Head-step tests switch the input step off; test_input_step_* covers it.
CFG = AdaptConfig(min_samples=20, store_max_cells=1000, cooldown_scenes=2, input_blend=0)


@pytest.fixture()
def store(colour_bundle: Path, tmp_path: Path) -> ModelStore:
    models = ModelStore(tmp_path / "state" / "models")
    models.install(colour_bundle)
    return models


@pytest.fixture(scope="module")
def runtime(colour_bundle: Path) -> ModelRuntime:
    return ModelRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cpu",)))


def _fill(adapter: Adapter, runtime: ModelRuntime, scenes: int = 6,
          cast: tuple[float, float, float] = BLUE_CAST) -> None:
    for seed in range(scenes):
        adapter.collect(colour_scene(runtime, 300 + seed, cast)[0])


def _shifted_accuracy(head_path: Path, runtime: ModelRuntime) -> float:
    head = read_head(head_path)
    hits = []
    for seed in range(900, 905):  # scenes the adaptation never saw
        cells, truth = colour_scene(runtime, seed, BLUE_CAST)
        hits.append(head.logits(cells.sample_features[:, 0]).argmax(1) == truth)
    return float(np.concatenate(hits).mean())


def test_shifted_stream_is_adapted_and_promoted(store: ModelStore, runtime: ModelRuntime,
                                                tmp_path: Path) -> None:
    adapter = Adapter(store, CFG, tmp_path / "state")
    _fill(adapter, runtime)
    before = _shifted_accuracy(store.active().file(CLASSIFIER), runtime)
    report = adapter.run("drift")
    assert report.promoted, report.as_dict()
    assert report.version_before == 1 and report.version_after == 2
    active = store.active()
    assert active.version == 2 and active.manifest.parent == 1
    assert active.manifest.metrics["adaptation"]["gate"]["passed"] is True
    assert report.gate["agreement_after"] > report.gate["agreement_before"]
    assert report.gate["source_acc_after"] >= report.gate["source_acc_source_head"] - 0.01
    assert report.counts["confirmed"] >= CFG.min_samples
    assert report.classifier_path == active.file(CLASSIFIER)
    after = _shifted_accuracy(active.file(CLASSIFIER), runtime)
    assert after > before
    json.dumps(report.as_dict())


def _accuracy(cells: SceneCells, truth: np.ndarray) -> float:
    return float((cells.labels == truth).mean())


def test_input_step_adds_a_routed_expert_then_owes_a_head_step(
        store: ModelStore, runtime: ModelRuntime, tmp_path: Path) -> None:
    adapter = Adapter(store, CFG.model_copy(update={"input_blend": 1.0}), tmp_path / "state")
    _fill(adapter, runtime)
    source = store.active()
    report = adapter.run("drift")
    assert report.step == "input" and report.promoted, report.as_dict()
    assert report.domain == DOMAIN
    gate = report.gate
    assert gate["radiometric_distance_after"] < 0.1 * gate["radiometric_distance_before"]
    assert gate["domain_fraction"] == 1.0
    adapted = store.active()
    assert adapted.version == 2 and adapted.manifest.parent == 1
    assert [d.name for d in adapted.manifest.domains] == [DOMAIN]
    # Its backbone's layer was re-normalised on the stored target tiles (4 cells x 2
    # scales of each of the 6 scenes, minus the quarter held out for the check).
    assert adapted.manifest.domains[0].backbone == f"backbone.{DOMAIN}.onnx"
    assert gate["renorm"]["layers"] == 1 and gate["renorm"]["tiles"] == 36
    assert adapted.backbone(DOMAIN).read_bytes() != source.file(BACKBONE).read_bytes()
    assert adapted.backbone(None) == adapted.file(BACKBONE)
    # Its drift reference is the new domain as the expert sees it.
    experts = adapted.domain_references()
    assert list(experts) == [DOMAIN]
    source_ref = source.reference
    assert experts[DOMAIN].bands[2].mean > source_ref.bands[2].mean + 50  # the blue cast
    check = gate["check"]  # the label-free check on the held-out quarter
    assert check["tiles"] == 12
    assert check["expert"]["confirmed"] >= check["source_model"]["confirmed"]
    # The source expert is untouched; the new one starts from the source head.
    assert adapted.manifest.input == source.manifest.input
    assert adapted.file(CLASSIFIER).read_bytes() == source.file(CLASSIFIER).read_bytes()
    assert adapted.classifier(DOMAIN).read_bytes() == source.file(CLASSIFIER).read_bytes()
    assert adapted.manifest.input_for(DOMAIN).mean != source.manifest.input.mean
    new_runtime = ModelRuntime(adapted, ProviderPlan(providers=("cpu",)))
    # Cast scenes route to the new expert, whose input spec undoes the cast...
    cells, truth = colour_scene(new_runtime, 950, BLUE_CAST)
    shifted, _ = colour_scene(runtime, 950, BLUE_CAST)
    assert cells.domain == DOMAIN and shifted.domain is None
    assert _accuracy(cells, truth) > _accuracy(shifted, truth)
    # ...while clean scenes still route to the source model: bit for bit what they were.
    clean_after, _ = colour_scene(new_runtime, 951)
    clean_before, _ = colour_scene(runtime, 951)
    assert clean_after.domain is None
    np.testing.assert_array_equal(clean_after.probs, clean_before.probs)
    # Stored features are from the source input spec: a head step waits for fresh cells.
    assert adapter.store.count(adapter.adapted_key()) == 0
    assert not adapter.due(drifting=False)
    for seed in range(3):
        adapter.collect(colour_scene(new_runtime, 960 + seed, BLUE_CAST)[0])
    assert adapter.store.count(adapter.adapted_key()) > 0
    assert adapter.due(drifting=False)  # owed after the input step, drift or not
    follow = adapter.run("follow-up")
    assert follow.step == "head" and follow.domain == DOMAIN, follow.as_dict()
    assert follow.action in ("promoted", "rejected", "skipped")
    if follow.promoted:  # a head step changes the expert's head only
        after = store.active()
        assert after.file(CLASSIFIER).read_bytes() == source.file(CLASSIFIER).read_bytes()
        assert follow.classifier_path == after.classifier(DOMAIN)
    assert adapter.run("again").step == "head"  # one expert per lineage: refine, not re-make


def test_expert_check_refuses_an_expert_that_breaks_the_features(
        store: ModelStore, runtime: ModelRuntime, tmp_path: Path) -> None:
    """A mis-calibrated input loses retrieval confirmation (every band squashed towards one
    value) or collapses the predictions (red pushed far up): the check names each."""
    adapter = Adapter(store, CFG, tmp_path / "state")
    _fill(adapter, runtime)
    source = store.active()
    stored = adapter.store.load(features=False)
    tiles = adapter.store.tiles(stored.seqs, 64)
    assert tiles is not None and len(tiles) == 48
    squashed = source.manifest.input.model_copy(update={"std": [1e4] * 3})
    gate: dict[str, Any] = {}
    backbone = source.file(BACKBONE)
    failures = adapter._expert_check(source, tiles, _features(squashed, backbone, tiles), gate)
    assert any("retrieval-confirmed share" in f for f in failures), gate
    assert gate["check"]["expert"]["confirmed"] < gate["check"]["source_model"]["confirmed"]
    reddened = source.manifest.input.model_copy(update={"mean": [-2000.0, 127.5, 127.5]})
    failures = adapter._expert_check(source, tiles, _features(reddened, backbone, tiles), gate)
    assert any("class collapse" in f for f in failures), gate
    same = _features(source.manifest.input, backbone, tiles)
    assert adapter._expert_check(source, tiles, same, {}) == []


def test_input_step_refuses_a_domain_most_stored_scenes_do_not_belong_to(
        store: ModelStore, runtime: ModelRuntime, tmp_path: Path) -> None:
    cfg = CFG.model_copy(update={"input_blend": 1.0, "domain_min_fraction": 0.5})
    adapter = Adapter(store, cfg, tmp_path / "state")
    _fill(adapter, runtime, scenes=5, cast=(0.0, 0.0, 0.0))
    _fill(adapter, runtime, scenes=2)  # two cast scenes among seven
    report = adapter.run("drift")
    refused = report.refused_input
    assert refused is not None and refused["action"] == "rejected", report.as_dict()
    assert refused["counts"]["domain_scenes"] == 2
    assert "route to the new domain" in refused["message"]
    assert refused["kept_at"] and Path(refused["kept_at"]).is_dir()
    assert report.step == "head"  # the job went on with the source model's head
    assert not store.active().manifest.domains


def test_gate_refuses_a_head_trained_on_wrong_labels(store: ModelStore, runtime: ModelRuntime,
                                                     tmp_path: Path) -> None:
    adapter = Adapter(store, CFG, tmp_path / "state")
    _fill(adapter, runtime)
    data = adapter.prepare()
    cells = data.confirmed
    wrong = (data.pseudo[cells] + 1) % 3
    head = adapter.fit(data, cells, wrong, deadline=time.monotonic() + 30)
    gate = adapter.gate(head, data)
    assert not gate.passed
    assert any("held-out confirmed target cells fell" in f for f in gate.failures)
    assert gate.figures["agreement_after"] < gate.figures["agreement_before"]
    good = adapter.fit(data, cells, data.pseudo[cells], deadline=time.monotonic() + 30)
    assert adapter.gate(good, data).passed
    assert store.active_version() == 1  # fit and gate never touch the store


def test_gate_judges_on_cells_the_fit_never_saw(store: ModelStore, runtime: ModelRuntime,
                                                tmp_path: Path) -> None:
    """Held-out cells are never fitted; at the agreement ceiling the teacher's must rise."""
    adapter = Adapter(store, CFG.model_copy(update={"agreement_ceiling": 0.5}),
                      tmp_path / "state")
    _fill(adapter, runtime)
    data = adapter.prepare()
    assert data.heldout.sum() == -(-len(data.candidates) // CFG.holdout_every)
    assert not data.heldout[data.confirmed].any() and data.heldout[data.validation].all()
    assert len(data.validation) > 0
    cells = data.confirmed
    good = adapter.fit(data, cells, data.pseudo[cells], deadline=time.monotonic() + 30)
    gate = adapter.gate(good, data)
    assert gate.figures["agreement_before"] >= 0.5  # at this ceiling: the teacher decides
    assert gate.passed, gate.failures
    assert gate.figures["teacher_agreement_after"] > gate.figures["teacher_agreement_before"]
    # The current head itself gains nothing over itself: refused, whatever the ceiling.
    same = adapter.gate(data.current, data)
    assert not same.passed and any("did not rise" in f for f in same.failures)


def test_rejected_update_is_kept_not_promoted(store: ModelStore, runtime: ModelRuntime,
                                              tmp_path: Path) -> None:
    """On clean data the source head already agrees fully with the confirmed cells and with
    the teacher, so there is nothing to gain."""
    adapter = Adapter(store, CFG, tmp_path / "state")
    _fill(adapter, runtime, cast=(0, 0, 0))
    report = adapter.run("manual")
    assert report.action == "rejected" and not report.promoted
    assert "did not rise" in report.message
    assert store.active_version() == 1 and [v.version for v in store.versions()] == [1]
    kept = Path(report.kept_at or "")
    assert kept.parent == tmp_path / "state" / "adapt" / "rejected"
    assert load_bundle(kept).manifest.parent == 1
    assert json.loads((kept / "report.json").read_text())["action"] == "rejected"
    # A box that stays off its domain refuses again and again: only the newest are kept.
    pruned = Adapter(store, CFG.model_copy(update={"keep_rejected": 2}), tmp_path / "state")
    reports = [pruned.run("again") for _ in range(3)]
    assert all(r.action == "rejected" for r in reports)
    left = sorted(p.name for p in kept.parent.iterdir())
    assert left == sorted(Path(r.kept_at or "").name for r in reports[-2:])


def test_reset_to_source_after_reset_after_updates(store: ModelStore, runtime: ModelRuntime,
                                                   tmp_path: Path) -> None:
    adapter = Adapter(store, CFG.model_copy(update={"reset_after": 1}), tmp_path / "state")
    _fill(adapter, runtime)
    assert adapter.run("drift").promoted
    report = adapter.run("drift")
    assert report.action == "reset" and report.model_changed
    assert report.version_before == 2 and report.version_after == 1
    assert store.active_version() == 1


def test_too_few_confirmed_cells_skip(store: ModelStore, runtime: ModelRuntime,
                                      tmp_path: Path) -> None:
    adapter = Adapter(store, CFG.model_copy(update={"min_samples": 10_000}), tmp_path / "state")
    assert adapter.run("manual").action == "skipped"  # nothing collected yet
    _fill(adapter, runtime, scenes=2)
    report = adapter.run("manual")
    assert report.action == "skipped" and "min_samples" in report.message
    assert store.active_version() == 1


def test_due_needs_drift_cells_and_cooldown(store: ModelStore, runtime: ModelRuntime,
                                            tmp_path: Path) -> None:
    adapter = Adapter(store, CFG, tmp_path / "state")
    assert not adapter.due(drifting=True)  # no cells
    _fill(adapter, runtime, scenes=2)
    assert not adapter.due(drifting=False)
    assert adapter.due(drifting=True)
    adapter.run("drift")
    assert not adapter.due(drifting=True)  # cooling down
    _fill(adapter, runtime, scenes=2)
    assert adapter.due(drifting=True)


def test_pseudo_labels_are_confident_and_capped() -> None:
    probs = np.array([[0.9, 0.1, 0], [0.95, 0.05, 0], [0.8, 0.2, 0], [0.2, 0.7, 0.1],
                      [0.4, 0.35, 0.25]])
    assert select_pseudo_labels(probs, tau=0.6, cap=2).tolist() == [0, 1, 3]


def _sha_tree(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.iterdir()) if p.is_file()}


def test_sigkill_during_adaptation_leaves_a_loadable_model(
        store: ModelStore, runtime: ModelRuntime, tmp_path: Path) -> None:
    state = tmp_path / "state"
    _fill(Adapter(store, CFG, state), runtime)
    original = _sha_tree(store.active().path)
    script = (
        "import sys\nfrom pathlib import Path\n"
        "from appliance.adapt.adapter import Adapter\nfrom appliance.config import AdaptConfig\n"
        "from appliance.model.store import ModelStore\n"
        "state = Path(sys.argv[1])\n"
        "adapter = Adapter(ModelStore(state / 'models'),"
        " AdaptConfig(min_samples=20, store_max_cells=1000, reset_after=1000, input_blend=0),"
        " state)\n"
        "print('ready', flush=True)\n"
        "while True:\n    adapter.run('crash-test')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for delay in (0.05, 0.3, 0.8):
        proc = subprocess.Popen([sys.executable, "-c", script, str(state)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        bundle = store.active()  # verifies every sha256
        ModelRuntime(bundle, ProviderPlan(providers=("cpu",)))
        store.cleanup()
        for version in store.versions():
            load_bundle(version.path)
    assert store.active_version() is not None
    assert _sha_tree(store.dir_for(1)) == original


def _cast(src: Path, dst: Path) -> Path:
    """``src`` under the blue cast the stored cells were shifted by."""
    with rasterio.open(src) as ds:
        data = ds.read().astype(np.float64)
        profile = ds.profile
    shifted = data + np.asarray(BLUE_CAST)[:, None, None]
    with rasterio.open(dst, "w", **profile) as ds:
        ds.write(np.clip(np.rint(shifted), 0, 255).astype(profile["dtype"]))
    return dst


def test_mqtt_adapt_and_rollback_commands(colour_bundle: Path, runtime: ModelRuntime,
                                          broker: Broker, tmp_path: Path) -> None:
    """cmd/adapt promotes from the stored cells, cmd/rollback goes back; events/model says so."""
    daemon = DaemonProc(tmp_path / "box", colour_bundle, broker.port,
                        adapt={"min_samples": 20, "store_max_cells": 1000})
    state = tmp_path / "box" / "state"
    store = ModelStore(state / "models")
    store.install(colour_bundle)
    _fill(Adapter(store, CFG, state), runtime)
    listener = Listener(broker.port, f"{P}/#")
    try:
        daemon.start()
        models = topic_is(f"{P}/events/model")
        status = topic_is(f"{P}/status")
        # Commands are not retained: send one only once the daemon is subscribed.
        daemon.wait(lambda: bool(listener.matching(status)), "daemon online")
        listener.publish(f"{P}/cmd/adapt", "{}")
        adapted = json.loads(listener.wait_for(models, timeout=60)[0].payload)
        assert adapted["action"] == "adapted"
        assert (adapted["previous"]["version"], adapted["model"]["version"]) == (1, 2)
        assert adapted["detail"]["gate"]["passed"] is True
        assert store.active_version() == 2
        # The running daemon routes each dropped scene to its sensor's expert.
        clean = write_scene(tmp_path / "clean.tif", size=(96, 96), layout=quarters(96, 96),
                            noise=10)
        results = topic_endswith("/result")
        for path in (_cast(clean, tmp_path / "cast.tif"), clean):
            daemon.drop(path)
            listener.wait_for(results, count=1 if path != clean else 2, timeout=60)
        routed = [json.loads(m.payload) for m in listener.matching(results)]
        assert [(r["source"], r["model"]["version"], r["model"]["domain"]) for r in routed] == [
            ("cast.tif", 2, DOMAIN), ("clean.tif", 2, None)]

        listener.publish(f"{P}/cmd/rollback", "")
        rolled = json.loads(listener.wait_for(models, count=2, timeout=60)[1].payload)
        assert rolled["action"] == "rollback"
        assert (rolled["previous"]["version"], rolled["model"]["version"]) == (2, 1)
        assert store.active_version() == 1
        daemon.wait(lambda: any(json.loads(m.payload)["model"]["version"] == 1
                                and "drifting" in json.loads(m.payload)["drift"]
                                for m in listener.matching(status)), "status with v1")
        assert daemon.terminate() == 0
    finally:
        listener.close()
        if daemon.proc is not None:
            daemon.kill()


def test_cloud_screen_flags_bright_alike_bands_only() -> None:
    means = np.array([[250.0, 248.0, 245.0],   # thick cloud
                      [225.0, 205.0, 160.0],   # bright sand: bands differ
                      [120.0, 118.0, 121.0],   # grey asphalt: not bright
                      [255.0, 255.0, 255.0]])  # saturated
    assert cloud_like(means, (0.0, 255.0), 0.8, 0.08).tolist() == [True, False, False, True]


def test_cloud_like_cells_are_never_candidates(store: ModelStore, runtime: ModelRuntime,
                                               tmp_path: Path) -> None:
    """A real GeoTIFF, half red ground, half white cloud, through the pipeline: only the
    ground cells are stored for pseudo-labelling."""
    path = tmp_path / "cloudy.tif"
    data = np.zeros((3, 128, 128), np.uint8)
    data[0, :, :64] = 200  # red ground on the left
    data[:, :, 64:] = 250  # cloud on the right
    with rasterio.open(path, "w", driver="GTiff", width=128, height=128, count=3,
                       dtype="uint8", crs="EPSG:32633",
                       transform=rasterio.transform.from_origin(500000, 5000000, 10, 10)
                       ) as dst:
        dst.write(data)
    settings = Settings.model_validate({"model": {"providers": ["cpu"]},
                                        "tiling": {"scales": [16, 32], "batch_size": 16}})
    cells = process_scene(path, "cd" * 32, tmp_path / "out", runtime, settings,
                          probe_sharpness=settings.adapt.enabled).cells
    assert cells.band_means is not None
    left = cells.windows[:, 0] + cells.windows[:, 2] <= 64
    right = cells.windows[:, 0] >= 64
    np.testing.assert_allclose(cells.band_means[right], 250.0, atol=3)  # edges resample
    adapter = Adapter(store, CFG, tmp_path / "state")
    stored = adapter.collect(cells)
    sampled = cells.sample_index
    assert stored == int(left[sampled].sum()) + int((~left & ~right)[sampled].sum())
    assert 0 < stored < len(sampled)
