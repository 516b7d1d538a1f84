"""Installing a model on a running daemon (real mosquitto, real HTTP server, real ONNX):
``cmd/install`` switches it between scenes without losing one; a tampered or incompatible
bundle is refused, the old model keeps serving and the refusal is published; the CLI's
``models install`` asks the running daemon the same way."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from appliance.cli.main import app as cli
from appliance.contract.bundle import read_manifest, seal_bundle
from appliance.contract.payloads import SceneResult
from appliance.model.install import manifest_digest
from tests.conftest import Broker
from tests.helpers.colour_bundle import versioned_copy
from tests.helpers.daemon import DaemonProc, P
from tests.helpers.http_files import FileServer
from tests.helpers.mqtt_listener import Listener, Received
from tests.helpers.scenes import write_scene


@pytest.fixture()
def daemon(tmp_path: Path, colour_bundle: Path, broker: Broker) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path / "box", colour_bundle, broker.port,
                   model={"install_dirs": [str(tmp_path / "drop")]},
                   adapt={"enabled": False})  # no adapted versions beside the installed
    yield d
    if d.proc is not None:
        d.kill()


def wait_listening(listener: Listener) -> None:
    """Until the daemon surely takes commands: "ready" comes before the broker connection,
    and its subscriptions go out after ``online``; stats published two ticks later follow
    them on the same connection, which the broker handles in order."""
    listener.wait_for(lambda m: m.topic == f"{P}/available" and m.payload == b"online")
    seen = len(listener.matching(lambda m: m.topic == f"{P}/stats"))
    listener.wait_for(lambda m: m.topic == f"{P}/stats", count=seen + 2)


def is_event(action: str, request: str | None = None) -> Callable[[Received], bool]:
    def pred(m: Received) -> bool:
        if m.topic != f"{P}/events/model":
            return False
        event = json.loads(m.payload)
        return bool(event["action"] == action and (request is None or
                                                    event.get("request") == request))
    return pred


def test_install_over_mqtt_switches_between_scenes_and_refuses_bad_bundles(
        daemon: DaemonProc, broker: Broker, colour_bundle: Path, tmp_path: Path) -> None:
    listener = Listener(broker.port, f"{P}/#")
    served = tmp_path / "served"
    served.mkdir()
    v2 = versioned_copy(colour_bundle, tmp_path / "v2", 2, 1, head_bias=6.0)
    with tarfile.open(served / "v2.tar.gz", "w:gz") as tar:
        tar.add(v2, arcname="v2")
    scenes = [write_scene(tmp_path / f"s{i}.tif", size=(128, 128), offset=float(i))
              for i in range(6)]
    daemon.start()
    wait_listening(listener)
    try:
        with FileServer(served) as server:
            for scene in scenes[:3]:
                daemon.drop(scene)
            listener.publish(f"{P}/cmd/install", json.dumps(
                {"source": server.url("v2.tar.gz"), "sha256": manifest_digest(v2),
                 "activate": True}))
            event = json.loads(listener.wait_for(is_event("install"), timeout=60)[0].payload)
        assert event["model"]["version"] == 2 and event["previous"]["version"] == 1
        assert event["source"].endswith("/v2.tar.gz")
        for scene in scenes[3:]:
            daemon.drop(scene)
        found = listener.wait_for(lambda m: m.topic.endswith("/result"), count=6, timeout=120)
        results = [SceneResult.model_validate_json(m.payload) for m in found]
        assert sorted(r.source for r in results) == sorted(s.name for s in scenes)
        assert {r.model.version for r in results[3:]} == {2}  # dropped after the switch
        assert not listener.matching(lambda m: m.topic.endswith("/failed"))

        # A tampered bundle in the allowed folder, and one with another embedding size.
        drop = tmp_path / "drop"
        bad = versioned_copy(colour_bundle, drop / "bad", 3, 2)
        (bad / "classifier.onnx").write_bytes(b"tampered")
        wide = versioned_copy(colour_bundle, drop / "wide", 4, 2)
        seal_bundle(wide, read_manifest(wide).model_copy(update={"embedding_dim": 7}))
        outside = versioned_copy(colour_bundle, tmp_path / "outside", 5, 2)
        for source in (bad, wide, outside):
            listener.publish(f"{P}/cmd/install",
                             json.dumps({"source": str(source), "activate": True}))
        refusals = listener.wait_for(is_event("refused", "install"), count=3, timeout=60)
        reasons = [json.loads(m.payload)["reason"] for m in refusals]
        assert "sha256 mismatch for classifier.onnx" in reasons[0]
        assert "embeddings have 7 dimensions" in reasons[1]
        assert "outside model.install_dirs" in reasons[2]
        assert all(json.loads(m.payload)["model"]["version"] == 2 for m in refusals)
        store = daemon.root / "state" / "models"
        assert json.loads((store / "ACTIVE").read_text())["version"] == 2
        assert not (store / "v0003").exists() and not (store / "v0004").exists()
        daemon.drop(write_scene(tmp_path / "after.tif", size=(128, 128), offset=9.0))
        after = listener.wait_for(lambda m: m.topic.endswith("/result"), count=7)[-1]
        assert SceneResult.model_validate_json(after.payload).model.version == 2
    finally:
        listener.close()


def test_models_install_on_a_running_box_asks_the_daemon(
        daemon: DaemonProc, broker: Broker, colour_bundle: Path, tmp_path: Path) -> None:
    listener = Listener(broker.port, f"{P}/#")
    v2 = versioned_copy(colour_bundle, tmp_path / "drop" / "v2", 2, 1, head_bias=6.0)
    bad = versioned_copy(colour_bundle, tmp_path / "drop" / "bad", 3, 1)
    (bad / "backbone.onnx").write_bytes(b"tampered")
    daemon.start()
    wait_listening(listener)
    try:
        runner = CliRunner()
        out = runner.invoke(cli, ["models", "install", str(v2), "--activate",
                                  "--timeout", "60", "--config", str(daemon.config)])
        assert out.exit_code == 0, out.output
        answer = json.loads(out.stdout)
        assert answer["action"] == "install" and answer["model"]["version"] == 2
        out = runner.invoke(cli, ["models", "install", str(bad), "--timeout", "60",
                                  "--config", str(daemon.config)])
        assert out.exit_code == 1
        assert "sha256 mismatch for backbone.onnx" in json.loads(out.stdout)["reason"]
        statuses = listener.wait_for(
            lambda m: m.topic == f"{P}/status" and json.loads(m.payload)["model"]["version"] == 2)
        assert statuses
    finally:
        listener.close()


def test_a_changed_seed_bundle_is_reported_or_installed_when_newer(
        tmp_path: Path, broker: Broker, colour_bundle: Path) -> None:
    v2 = versioned_copy(colour_bundle, tmp_path / "seed-v2", 2, 1, head_bias=6.0)
    d = DaemonProc(tmp_path / "box", colour_bundle, broker.port, adapt={"enabled": False})
    listener = Listener(broker.port, f"{P}/#")
    try:
        d.start()
        assert d.terminate() == 0
        config = d.config.read_text().replace(str(colour_bundle), str(v2))
        d.config.write_text(config)
        d.start()  # a new seed, not installed: reported, v1 keeps running
        event = json.loads(listener.wait_for(is_event("seed-differs"))[0].payload)
        assert event["model"]["version"] == 1 and "install_newer" in event["reason"]
        assert b"differs from every installed version and does not run" in d.log.read_bytes()
        assert d.terminate() == 0
        d.config.write_text(config.replace("providers:", "install_newer: true\n  providers:"))
        d.start()  # allowed: installed through the same checks, and run
        event = json.loads(listener.wait_for(is_event("install"))[0].payload)
        assert event["model"]["version"] == 2 and event["source"] == str(v2)
        assert d.terminate() == 0
    finally:
        if d.proc is not None:
            d.kill()
        listener.close()
