"""A box behind a site broker bridged to a central broker: two real mosquittos, the
bridge configured by configs/mosquitto.site-bridge.conf, a real daemon on the site.

Results reach a subscriber at the centre; with the centre down the site broker holds
them, with the site broker down the box's outbox does, and nothing is lost either way.
A job published at the centre for the site reaches the site's box, and its events come
back to the centre.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.config import MQTTConfig
from appliance.contract.payloads import SceneResult
from appliance.fleet.link import FleetLink
from appliance.fleet.submit import SceneRequest, submit_jobs
from tests.conftest import Broker
from tests.helpers.daemon import DaemonProc
from tests.helpers.mqtt_listener import Listener, Received
from tests.helpers.paths import REPO
from tests.helpers.scenes import write_scene

SITE_CONF = REPO / "configs" / "mosquitto.site-bridge.conf"


def persistent(broker: Broker, folder: Path, extra: str = "") -> Broker:
    folder.mkdir(parents=True, exist_ok=True)
    broker.conf.write_text(f"listener {broker.port} 127.0.0.1\nallow_anonymous true\n"
                           f"persistence true\npersistence_location {folder}/\n"
                           "max_queued_messages 100000\n" + extra)
    return broker


@pytest.fixture()
def central(tmp_path: Path) -> Iterator[Broker]:
    (tmp_path / "central").mkdir()
    b = persistent(Broker(tmp_path / "central"), tmp_path / "central-db")
    b.start()
    yield b
    b.stop()


@pytest.fixture()
def site(tmp_path: Path, central: Broker) -> Iterator[Broker]:
    """The site broker, from the shipped bridge config with this machine's ports."""
    folder = tmp_path / "site"
    folder.mkdir()
    b = Broker(folder)
    text = SITE_CONF.read_text()
    for old, new in (("listener 1883", f"listener {b.port} 127.0.0.1"),
                     ("persistence_location /var/lib/mosquitto/",
                      f"persistence_location {folder}/"),
                     ("address central.example.org:1883", f"address 127.0.0.1:{central.port}")):
        assert old in text
        text = text.replace(old, new)
    b.conf.write_text(text)
    b.start()
    yield b
    b.stop()


def is_result(m: Received) -> bool:
    return m.topic.endswith("/result")


def test_results_cross_the_bridge_and_survive_either_broker_going_down(
        tmp_path: Path, colour_bundle: Path, central: Broker, site: Broker) -> None:
    box = DaemonProc(tmp_path / "box", colour_bundle, site.port, node_id="edge-site")
    # a persistent session at the centre: it survives the centre's restart
    hq = Listener(central.port, "terratile/+/scene/+/result", client_id="hq",
                  session_expiry=600)
    scenes = [write_scene(tmp_path / f"s{i}.tif", size=(128, 128), noise=3.0, seed=i)
              for i in range(3)]
    try:
        box.start()
        box.drop(scenes[0])
        hq.wait_for(is_result, 1, timeout=60)

        central.stop()  # the link to the centre is down: the site broker holds results
        box.drop(scenes[1])
        box.wait(lambda: len(box.scenes()) == 2 and not box.outbox_topics(),
                 "the second result taken by the site broker")
        central.start()
        hq.wait_for(is_result, 2, timeout=60)

        site.stop()  # the box cannot publish at all: its outbox holds the result
        box.drop(scenes[2])
        box.wait(lambda: len(box.scenes()) == 3 and any(
            t.endswith("/result") for t in box.outbox_topics()), "the third result waiting")
        site.start()
        got = hq.wait_for(is_result, 3, timeout=60)
    finally:
        if box.proc is not None:
            box.kill()
        hq.close()
    results = [SceneResult.model_validate_json(m.payload) for m in got]
    assert sorted(r.source for r in results) == ["s0.tif", "s1.tif", "s2.tif"]
    assert {r.node_id for r in results} == {"edge-site"}
    assert all(m.topic == f"terratile/edge-site/scene/{r.scene_id}/result"
               for m, r in zip(got, results, strict=True))


def test_a_job_for_the_site_crosses_the_bridge_and_its_events_come_back(
        tmp_path: Path, colour_bundle: Path, central: Broker, site: Broker) -> None:
    """Submitted at the centre on the site's jobs topic, as ``fleet submit --topic`` does."""
    shared = tmp_path / "shared"
    shared.mkdir()
    scene = write_scene(shared / "s.tif", size=(128, 128))
    box = DaemonProc(tmp_path / "box", colour_bundle, site.port, node_id="edge-site",
                     fleet={"enabled": True, "shared_dirs": [str(shared)]})
    online = Listener(central.port, "terratile/+/available")
    try:
        box.start()
        online.wait_for(lambda m: m.topic == "terratile/edge-site/available"
                        and m.payload == b"online", timeout=30)
        with FleetLink(MQTTConfig(port=central.port)) as link:
            report = submit_jobs(link, [SceneRequest(str(scene))], lease=30, timeout=60,
                                 topic="terratile-sites/site-a/jobs")
    finally:
        if box.proc is not None:
            box.kill()
        online.close()
    assert report.complete, report.as_dict()
    job = report.jobs[0]
    assert (job.node, job.submissions) == ("edge-site", 1)
    assert job.scene_id is not None and box.scenes()[job.scene_id][0] == "done"
