"""The adapter's jobs on the colour bundle: it proposes, never installs; crash safety; MQTT."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import rasterio

from appliance.adapt.adapter import Adapter
from appliance.adapt.lineage import DOMAIN, Lineage
from appliance.config import TilingConfig
from appliance.contract.bundle import CLASSIFIER, load_bundle
from appliance.contract.payloads import AdaptationReport, HeadCounts, HeadGate
from appliance.model.head import read_head
from appliance.model.runtime import ModelRuntime, ProviderPlan, probabilities
from appliance.model.store import ModelStore
from appliance.scene.fusion import fuse
from tests.conftest import Broker
from tests.helpers.adaptation import HEAD_ONLY, TILING, apply, fill
from tests.helpers.colour_scenes import BLUE_CAST, colour_scene
from tests.helpers.daemon import DaemonProc, P
from tests.helpers.mqtt_listener import Listener, topic_endswith, topic_is
from tests.helpers.paths import REPO
from tests.helpers.scenes import quarters, write_scene


def _shifted_accuracy(head_path: Path, runtime: ModelRuntime) -> float:
    head = read_head(head_path)
    hits = []
    for seed in range(900, 905):  # scenes the adaptation never saw
        cells, truth = colour_scene(runtime, seed, BLUE_CAST)
        hits.append(head.logits(cells.sample_features[:, 0]).argmax(1) == truth)
    return float(np.concatenate(hits).mean())


def test_a_promoted_job_proposes_a_candidate_and_leaves_active_alone(
        store: ModelStore, runtime: ModelRuntime, tmp_path: Path) -> None:
    adapter = Adapter(store, HEAD_ONLY, tmp_path / "state", TILING)
    fill(adapter, runtime)
    active = store.active()
    pointer = (store.root / "ACTIVE").read_bytes()
    report = adapter.run(active, "drift")
    assert report.promoted and report.model_changed, report.as_dict()
    assert store.active_version() == 1 and (store.root / "ACTIVE").read_bytes() == pointer
    assert [v.version for v in store.versions()] == [1]
    assert report.version_before == 1 and report.version_after is None
    assert report.bundle_path is None and report.reset_to is None
    # The candidate is sealed, loadable and installable; installing it changes nothing else.
    assert report.candidate is not None
    candidate = load_bundle(Path(report.candidate))
    assert candidate.version == 2 and candidate.manifest.parent == 1
    assert candidate.manifest.metrics["adaptation"]["gate"]["passed"] is True
    installed = store.install(Path(report.candidate), activate=False)
    assert installed.version == 2 and store.active_version() == 1
    assert not Path(report.candidate).exists()  # moved in, not copied
    assert store.activate(2).file(CLASSIFIER).read_bytes() != active.file(CLASSIFIER).read_bytes()
    assert _shifted_accuracy(installed.file(CLASSIFIER), runtime) > _shifted_accuracy(
        active.file(CLASSIFIER), runtime)


def test_a_promoted_head_step_reports_its_gate_and_rounds(
        store: ModelStore, runtime: ModelRuntime, tmp_path: Path) -> None:
    adapter = Adapter(store, HEAD_ONLY, tmp_path / "state", TILING)
    fill(adapter, runtime)
    report = adapter.run(store.active(), "drift")
    gate, counts = report.gate, report.counts
    assert report.step == "head" and report.domain is None
    assert isinstance(gate, HeadGate) and isinstance(counts, HeadCounts)
    assert gate.agreement_after > gate.agreement_before
    assert gate.source_acc_after >= gate.source_acc_source_head - 0.01
    assert counts.confirmed >= HEAD_ONLY.min_samples
    assert [r.round for r in report.rounds] == [1, 2, 3]
    assert report.seconds > 0
    assert AdaptationReport.model_validate_json(json.dumps(report.as_dict())) == report


def test_adapter_fuses_scales_with_the_configured_rule(
        store: ModelStore, runtime: ModelRuntime, tmp_path: Path) -> None:
    """Daemon and CLI build the adapter with ``tiling``: it fuses as the pipeline does."""
    tiling = TilingConfig(scales=[16, 32], fusion="max")
    adapter = Adapter(store, HEAD_ONLY, tmp_path / "state", tiling)
    for seed in range(300, 303):  # scales that disagree: the cast at 16 px, none at 32 px
        cast, clean = colour_scene(runtime, seed, BLUE_CAST)[0], colour_scene(runtime, seed)[0]
        both = np.stack([cast.sample_features[:, 0], clean.sample_features[:, 0]], axis=1)
        adapter.collect(replace(cast, sample_features=both), runtime.bundle)
    data = adapter.head_step.prepare(Lineage.of(store, store.active()))
    feats = data.candidates.features
    n, s, d = feats.shape
    per_scale = probabilities(data.teacher.logits(feats.reshape(n * s, d)), False)
    per_scale = per_scale.reshape(n, s, -1)
    np.testing.assert_array_equal(data.teacher_probs, fuse(per_scale, "max"))
    assert not np.allclose(data.teacher_probs, fuse(per_scale, "mean"))


def test_rejected_candidates_are_kept_newest_first(store: ModelStore, runtime: ModelRuntime,
                                                   tmp_path: Path) -> None:
    """On clean data the source head already agrees fully with the confirmed cells and with
    the teacher, so there is nothing to gain: refused, kept, never proposed."""
    adapter = Adapter(store, HEAD_ONLY.model_copy(update={"keep_rejected": 2}),
                      tmp_path / "state", TILING)
    fill(adapter, runtime, cast=(0, 0, 0))
    report = adapter.run(store.active(), "manual")
    assert report.action == "rejected" and not report.model_changed
    assert "did not rise" in report.message and report.candidate is None
    assert store.active_version() == 1 and [v.version for v in store.versions()] == [1]
    kept = Path(report.kept_at or "")
    assert kept.parent == tmp_path / "state" / "adapt" / "rejected"
    assert load_bundle(kept).manifest.parent == 1
    assert json.loads((kept / "report.json").read_text())["action"] == "rejected"
    assert not list(store.staging.iterdir())
    # A box that stays off its domain refuses again and again: only the newest are kept.
    reports = [adapter.run(store.active(), "again") for _ in range(2)]
    assert all(r.action == "rejected" for r in reports)
    left = sorted(p.name for p in kept.parent.iterdir())
    assert left == sorted(Path(r.kept_at or "").name for r in reports)


def test_reset_is_proposed_after_reset_after_versions(store: ModelStore, runtime: ModelRuntime,
                                                      tmp_path: Path) -> None:
    adapter = Adapter(store, HEAD_ONLY.model_copy(update={"reset_after": 1}),
                      tmp_path / "state", TILING)
    fill(adapter, runtime)
    assert apply(store, adapter.run(store.active(), "drift")).version_after == 2
    report = adapter.run(store.active(), "drift")
    assert report.action == "reset" and report.model_changed
    assert report.reset_to == 1 and report.version_before == 2
    assert "1 adapted versions since the source" in report.message
    assert store.active_version() == 2  # proposed, not done
    assert apply(store, report).version_after == 1 and store.active_version() == 1


def test_nothing_to_learn_from_is_skipped(store: ModelStore, runtime: ModelRuntime,
                                          tmp_path: Path) -> None:
    adapter = Adapter(store, HEAD_ONLY.model_copy(update={"min_samples": 10_000}),
                      tmp_path / "state", TILING)
    empty = adapter.run(store.active(), "manual")
    assert empty.action == "skipped" and "no candidate cells" in empty.message
    assert empty.counts is None and empty.gate is None
    fill(adapter, runtime, scenes=2)
    report = adapter.run(store.active(), "manual")
    assert report.action == "skipped" and "min_samples" in report.message
    assert report.counts is not None and store.active_version() == 1


def test_one_job_at_a_time(store: ModelStore, runtime: ModelRuntime, tmp_path: Path) -> None:
    adapter = Adapter(store, HEAD_ONLY, tmp_path / "state", TILING)
    fill(adapter, runtime)
    bundle = store.active()
    started, release = threading.Event(), threading.Event()
    original = adapter.head_step.prepare

    def slow(lineage: Lineage) -> object:
        started.set()
        release.wait(10)
        return original(lineage)

    adapter.head_step.prepare = slow  # type: ignore[method-assign]
    worker = threading.Thread(target=adapter.run, args=(bundle, "first"))
    worker.start()
    assert started.wait(10) and adapter.running
    second = adapter.run(bundle, "second")
    assert second.action == "skipped" and "another adaptation job" in second.message
    assert not adapter.due(drifting=True, bundle=bundle)
    release.set()
    worker.join(10)
    assert not adapter.running


def _sha_tree(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.iterdir()) if p.is_file()}


def test_sigkill_during_adaptation_leaves_a_loadable_model(
        store: ModelStore, runtime: ModelRuntime, tmp_path: Path) -> None:
    """A job killed at any moment, and its proposal installed at once by the same process
    (as the model host does), leaves every version loadable and v1 untouched."""
    state = tmp_path / "state"
    fill(Adapter(store, HEAD_ONLY, state, TILING), runtime)
    original = _sha_tree(store.active().path)
    script = (
        "import sys\nfrom pathlib import Path\n"
        "from appliance.adapt.adapter import Adapter\n"
        "from appliance.config import AdaptConfig, TilingConfig\n"
        "from appliance.model.store import ModelStore\n"
        "state = Path(sys.argv[1])\nmodels = ModelStore(state / 'models')\n"
        "adapter = Adapter(models,"
        " AdaptConfig(min_samples=20, store_max_cells=1000, reset_after=1000, input_blend=0),"
        " state, TilingConfig(scales=[16, 32]))\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    report = adapter.run(models.active(), 'crash-test')\n"
        "    if report.candidate:\n"
        "        models.install(Path(report.candidate), activate=True)\n"
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
        store.cleanup()  # the killed process's staged candidates go
        assert not list(store.staging.glob("*"))
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
    fill(Adapter(store, HEAD_ONLY, state, TILING), runtime)
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
        assert adapted["detail"]["version_after"] == 2
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
        assert rolled["action"] == "rollback" and rolled["detail"] is None
        assert (rolled["previous"]["version"], rolled["model"]["version"]) == (2, 1)
        assert store.active_version() == 1
        daemon.wait(lambda: any(json.loads(m.payload)["model"]["version"] == 1
                                and json.loads(m.payload)["drift"]["adapting"] is False
                                for m in listener.matching(status)), "status with v1")
        assert daemon.terminate() == 0
    finally:
        listener.close()
        if daemon.proc is not None:
            daemon.kill()
