"""The composition root in-process, without a broker: what it builds and how it wires it."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import rasterio
from rasterio.warp import transform

from appliance.app import App, StartError
from appliance.config import Settings
from appliance.contract.bundle import Manifest, seal_bundle
from tests.conftest import Broker
from tests.helpers.colour_bundle import versioned_copy
from tests.helpers.colour_scenes import BLUE_CAST, colour_scene
from tests.helpers.mqtt_listener import Listener
from tests.helpers.scenes import halves, quarters, write_scene


def _settings(root: Path, bundle: Path) -> Settings:
    return Settings(paths={k: root / k for k in ("inbox", "results", "failed", "state")},
                    model={"bundle": bundle, "providers": ["cpu"], "warmup": False},
                    tiling={"scales": [16, 32], "batch_size": 64},
                    input={"settle_seconds": 0.0}, mqtt={"enabled": False},
                    drift={"min_scenes": 1, "window": 3})


@pytest.fixture()
def app(tmp_path: Path, colour_bundle: Path) -> Iterator[App]:
    node = App(_settings(tmp_path / "box", colour_bundle))
    node.build()
    yield node
    node.stop()


def test_a_second_daemon_on_the_same_state_is_refused(app: App, colour_bundle: Path) -> None:
    other = App(app.settings)
    with pytest.raises(StartError, match="another terratile daemon holds"):
        other.build()


def test_a_scene_goes_through_the_wired_steps(app: App, tmp_path: Path) -> None:
    scene = write_scene(tmp_path / "halves.tif", size=(96, 96), layout=halves(96, 96))
    dropped = app.inbox.dir / scene.name
    shutil.copy(scene, dropped)
    work = app.inbox.claim(dropped)
    assert work is not None
    assert app.lifecycle.handle(work) == "done"
    assert app.index is not None and app.index.count() > 0
    assert app.drift is not None and app.drift.status().window.scenes == 1
    row = json.loads(app.journal.pending()[0].payload)
    assert row["drift"]["scene_id"] == row["scene_id"]
    assert app.telemetry.status().queue_depth == 0
    assert app.telemetry.counters["done"] == 1


def _drifted(app: App, scenes: int = 3) -> None:
    for seed in range(scenes):
        cells, _ = colour_scene(app.host.runtime, 900 + seed, BLUE_CAST)
        assert app.drift is not None
        app.drift.observe(cells)


def test_a_new_head_restarts_drifts_confidence_detectors_only(app: App, tmp_path: Path,
                                                              colour_bundle: Path) -> None:
    _drifted(app)
    assert app.drift is not None
    before = app.drift.status().window
    assert before.scenes == 3 and before.ph_max_prob > 0
    app.host.install(versioned_copy(colour_bundle, tmp_path / "v2", 2, 1, head_bias=1.0))
    app.host.activate(2)  # same source reference: an adapted head
    after = app.drift.status().window
    assert after.scenes == 3  # the window of scenes stays
    assert after.ph_max_prob == 0 and after.ph_entropy == 0


def test_a_different_model_makes_drift_forget_everything(app: App, tmp_path: Path,
                                                         colour_bundle: Path) -> None:
    _drifted(app)
    other = versioned_copy(colour_bundle, tmp_path / "other", 5, None)
    reference = json.loads((other / "reference.json").read_text())
    reference["confidence"]["mean_max_prob"] = 0.5  # another model, another baseline
    (other / "reference.json").write_text(json.dumps(reference))
    seal_bundle(other, Manifest.model_validate_json((other / "manifest.json").read_text()))
    app.host.install(other)
    app.host.activate(5)
    assert app.drift is not None
    window = app.drift.status().window
    assert window.scenes == 0 and window.ph_max_prob == 0


def test_an_indexed_scene_is_queryable_over_mqtt(tmp_path: Path, broker: Broker,
                                                 colour_bundle: Path) -> None:
    """The composition root wires the index into comms: a processed scene's cells answer
    a retrieval request on the daemon's topic."""
    settings = Settings.model_validate({
        "node_id": "n2",
        "paths": {k: str(tmp_path / k) for k in ("inbox", "results", "failed", "state")},
        "model": {"bundle": str(colour_bundle), "providers": ["cpu"]},
        "tiling": {"scales": [16, 32]}, "mqtt": {"port": broker.port},
    })
    node = App(settings)
    node.build()
    assert node.comms is not None and node.index is not None
    node.start_comms()
    listener = Listener(broker.port, "terratile/n2/retrieval/response/#")
    try:
        work = settings.paths.work_dir
        work.mkdir(parents=True, exist_ok=True)
        scene = write_scene(work / "q.tif", size=(64, 64), layout=quarters(64, 64))
        scene_id = hashlib.sha256(scene.read_bytes()).hexdigest()
        with rasterio.open(scene) as src:
            x, y = src.xy(8, 8)  # inside the top-left (urban) quarter
            lon, lat = transform(src.crs, "EPSG:4326", [x], [y])
        assert node.lifecycle.handle(scene) == "done"
        assert node.index.count() == 16
        request = json.dumps({"request_id": "d1", "scene_id": scene_id,
                              "lonlat": [lon[0], lat[0]], "k": 20})
        for _ in range(50):  # until the request subscription is live
            listener.publish("terratile/n2/retrieval/query", request)
            try:
                got = listener.wait_for(lambda m: m.topic.endswith("/d1"), timeout=0.2)
                break
            except TimeoutError:
                continue
        else:
            pytest.fail("the daemon never answered the retrieval request")
        results = json.loads(got[0].payload)["results"]
        assert len(results) == 15  # every other cell of the scene; the query cell left out
        assert {r["scene_id"] for r in results} == {scene_id}
        assert [r["class"] for r in results[:7]] == ["urban"] * 7  # its own half first
    finally:
        listener.close()
        node.stop()
