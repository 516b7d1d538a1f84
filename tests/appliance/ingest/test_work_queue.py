"""The fleet's shared work queue end to end: three real daemons on one real mosquitto
(persistence on), scenes served as real COGs by a real nginx (byte ranges), jobs
submitted by the fleet CLI's own engine (``submit_jobs``) with leases.

Scenes are 256² COGs, the bundle the tiny colour classifier, so 30 jobs take seconds.
One fleet serves the whole module, in the order of the tests (the last one kills a node
for good); each test has scenes of its own, so none is a duplicate of another's.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from appliance.config import MQTTConfig
from appliance.contract.payloads import JobEvent, SceneResult, result_msg_id
from appliance.fleet.link import FleetLink
from appliance.fleet.submit import SceneRequest, SubmitReport, submit_jobs
from tests.conftest import Broker
from tests.helpers.daemon import DaemonProc
from tests.helpers.mqtt_listener import Listener, Received
from tests.helpers.range_server import RangeServer, write_cog
from tests.helpers.scenes import write_scene

NODES = ("edge-a", "edge-b", "edge-c")
SCENES = 30
SETS = {"s": SCENES, "d": 1, "k": 12, "g": 12}  # name prefix → scenes: one set per test


def urls(server: RangeServer, prefix: str) -> list[SceneRequest]:
    return [SceneRequest(server.url(f"{prefix}{i:02d}.tif")) for i in range(SETS[prefix])]


@pytest.fixture(scope="module")
def cogs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Distinct 256² COGs (the same layout, different noise), ``SETS`` of them."""
    folder = tmp_path_factory.mktemp("www")
    plain = tmp_path_factory.mktemp("plain")
    seed = 0
    for prefix, count in SETS.items():
        for i in range(count):
            name = f"{prefix}{i:02d}.tif"
            write_cog(write_scene(plain / name, noise=4.0, seed=seed), folder / name)
            seed += 1
    return folder


@pytest.fixture(scope="module")
def server(cogs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RangeServer]:
    with RangeServer(cogs, tmp_path_factory.mktemp("nginx")) as s:
        yield s


@pytest.fixture(scope="module")
def durable_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """mosquitto with persistence on: sessions and their queued jobs survive."""
    tmp_path = tmp_path_factory.mktemp("broker")
    b = Broker(tmp_path)
    b.conf.write_text(f"listener {b.port} 127.0.0.1\nallow_anonymous true\n"
                      "max_queued_messages 100000\npersistence true\n"
                      f"persistence_location {tmp_path}/\n")
    b.start()
    yield b
    b.stop()


class Fleet:
    """Three daemons sharing the job queue; ``shared`` is their shared directory."""

    def __init__(self, root: Path, bundle: Path, port: int, session_expiry: int) -> None:
        self.shared = root / "shared"
        self.shared.mkdir(parents=True)
        self.port = port
        self.nodes = {n: DaemonProc(root / n, bundle, port, node_id=n, fleet={
            "enabled": True, "max_inflight": 2, "session_expiry": session_expiry,
            "shared_dirs": [str(self.shared)], "schemes": ["http"], "http_timeout": 5})
            for n in NODES}

    def start(self) -> None:
        for node in self.nodes.values():
            node.start()

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.proc is not None:
                node.kill()

    def submit(self, requests: list[SceneRequest], lease: float, timeout: float
               ) -> SubmitReport:
        with FleetLink(MQTTConfig(port=self.port)) as link:
            return submit_jobs(link, requests, lease, timeout)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, colour_bundle: Path,
          durable_broker: Broker) -> Iterator[Fleet]:
    f = Fleet(tmp_path_factory.mktemp("fleet"), colour_bundle, durable_broker.port,
              session_expiry=3)
    with ExitStack() as stack:
        stack.callback(f.stop)
        f.start()
        yield f


def is_result(m: Received) -> bool:
    return m.topic.endswith("/result")


def test_thirty_jobs_are_done_exactly_once_and_spread_over_three_nodes(
        fleet: Fleet, server: RangeServer, durable_broker: Broker) -> None:
    results = Listener(durable_broker.port, "terratile/+/scene/+/result")
    statuses = Listener(durable_broker.port, "terratile/+/status")
    report = fleet.submit(urls(server, "s"), lease=60, timeout=100)
    assert report.complete, report.as_dict()
    assert report.count("done") == SCENES and not [j for j in report.jobs if j.submissions > 1]
    got = results.wait_for(is_result, SCENES)
    time.sleep(0.5)  # a second result of any scene would be here by now
    payloads = [SceneResult.model_validate_json(m.payload) for m in results.matching(is_result)]
    assert len({p.scene_id for p in payloads}) == SCENES == len(payloads) == len(got)
    for job, result in zip(sorted(report.jobs, key=lambda j: j.job.scene),
                           sorted(payloads, key=lambda p: p.origin.url or "" if p.origin else ""),
                           strict=True):
        assert result.origin is not None and result.origin.url == job.job.scene
        assert result.origin.kind == "http" and result.source == job.job.scene.rsplit("/")[-1]
        assert job.result_msg_id == result.msg_id == result_msg_id(result.scene_id)
        assert job.node == result.node_id
    per_node = {n: sum(1 for p in payloads if p.node_id == n) for n in NODES}
    assert all(count >= 5 for count in per_node.values()), per_node
    ranged = [h for h in server.hits() if h.method == "GET"]
    assert ranged and all(h.status == 206 for h in ranged)  # never a whole-file GET
    busy = [json.loads(m.payload) for m in statuses.matching(lambda m: True)]
    assert max(b["queue_depth"] for b in busy) >= 1  # the status counts the open jobs


def test_a_resubmitted_unchanged_scene_is_a_duplicate_with_the_same_msg_id(
        fleet: Fleet, server: RangeServer) -> None:
    reports = [fleet.submit(urls(server, "d"), lease=60, timeout=60) for _ in range(4)]
    jobs = [j for r in reports for j in r.jobs]
    assert all(r.complete for r in reports)
    assert len({j.result_msg_id for j in jobs}) == 1 and len({j.scene_id for j in jobs}) == 1
    sid = jobs[0].scene_id
    assert sid is not None
    def lines(node: str, words: str) -> int:
        text = fleet.nodes[node].log.read_text()
        return sum(1 for line in text.splitlines() if f"scene {sid[:12]} " in line
                   and words in line)

    computed = {n: lines(n, "done in") for n in NODES}
    assert all(c <= 1 for c in computed.values()), computed  # four jobs, three nodes:
    assert sum(lines(n, "not recomputed") for n in NODES) >= 1  # one was a duplicate


def test_bad_jobs_each_get_a_failed_with_a_reason(fleet: Fleet, server: RangeServer,
                                                  durable_broker: Broker,
                                                  tmp_path: Path) -> None:
    """Refused on receipt or when run, never a crash; a job asking for its events on a
    command topic gets them on the node's own events topic."""
    inside = write_cog(write_scene(tmp_path / "p.tif"), fleet.shared / "p.tif")
    reply = "clients/test/jobs"
    events = Listener(durable_broker.port, reply, "terratile/+/jobs/events")
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", durable_broker.port)
    client.loop_start()
    jobs = {
        "missing": server.url("nothing.tif"),
        "closed": "http://127.0.0.1:9/a.tif",
        "outside": str(tmp_path / "elsewhere.tif"),
        "escape": f"{fleet.shared}/../elsewhere.tif",
        "scheme": "ftp://host/a.tif",
        "shared": str(inside),
    }
    for job_id, scene in jobs.items():
        client.publish("terratile/jobs", json.dumps({
            "schema": "terratile.scene-job/1", "job_id": job_id, "scene": scene,
            "reply_to": reply}), qos=1).wait_for_publish(5)
    for junk in (b"not json", b"[]", json.dumps({"schema": "terratile.scene-job/1",
                                                  "job_id": "x" * 500, "scene": "a"}).encode(),
                 json.dumps({"schema": "terratile.scene-job/1", "job_id": "evil",
                             "scene": server.url("s01.tif"),
                             "reply_to": "terratile/edge-a/cmd/rollback"}).encode(),
                 b"{" * 10_000):
        client.publish("terratile/jobs", junk, qos=1).wait_for_publish(5)

    def final(m: Received) -> bool:
        return json.loads(m.payload).get("event") in ("done", "failed")

    got = [JobEvent.model_validate_json(m.payload) for m in events.wait_for(final, 11, 60)]
    by_job = {e.job_id: e for e in got if e.job_id in jobs or e.job_id == "evil"}
    assert {k: (v.event, v.reason) for k, v in by_job.items()} == {
        "missing": ("failed", "unreachable"), "closed": ("failed", "unreachable"),
        "outside": ("failed", "outside-shared-dirs"),
        "escape": ("failed", "outside-shared-dirs"), "scheme": ("failed", "scheme"),
        "shared": ("done", None), "evil": ("done", None)}
    malformed = [e for e in got if e.job_id not in by_job]
    assert len(malformed) == 4 and {e.reason for e in malformed} == {"malformed"}
    assert all(e.message for e in got if e.event == "failed")
    evil = [m for m in events.matching(final) if json.loads(m.payload)["job_id"] == "evil"]
    assert evil[0].topic.endswith("/jobs/events")  # not the command topic it asked for
    client.loop_stop()
    client.disconnect()
    assert all(d.proc is not None and d.proc.poll() is None for d in fleet.nodes.values())


def _submit_and_kill(fleet: Fleet, server: RangeServer, victim: DaemonProc, prefix: str,
                     lease: float, restart: bool) -> tuple[SubmitReport, str]:
    """Submit a batch, SIGKILL ``victim`` as soon as one of its scenes is being processed
    (restarting it when asked), and wait for the submitter; its report and the killed
    scene's id."""
    with FleetLink(MQTTConfig(port=fleet.port)) as link:
        outcome: list[SubmitReport] = []
        runner = threading.Thread(target=lambda: outcome.append(
            submit_jobs(link, urls(server, prefix), lease=lease, timeout=110)))
        runner.start()
        victim.wait(lambda: any(s == "processing" for s, _ in victim.scenes().values()),
                    "a scene in processing", 60)
        victim.kill()
        killed = next(sid for sid, (s, _) in victim.scenes().items() if s == "processing")
        if restart:
            victim.start()
        runner.join(120)
    return outcome[0], killed


def test_a_node_killed_mid_job_and_restarted_finishes_its_work(
        fleet: Fleet, server: RangeServer) -> None:
    victim = fleet.nodes["edge-a"]
    report, killed = _submit_and_kill(fleet, server, victim, "k", lease=15, restart=True)
    assert report.complete, report.as_dict()
    assert victim.scenes()[killed][0] == "done"  # taken up again from its journal
    assert killed in {j.scene_id for j in report.jobs}


def test_a_node_killed_for_good_has_its_jobs_done_elsewhere(
        fleet: Fleet, server: RangeServer) -> None:
    report, killed = _submit_and_kill(fleet, server, fleet.nodes["edge-b"], "g", lease=8,
                                      restart=False)
    assert report.complete, report.as_dict()
    assert not [j for j in report.jobs if j.node == "edge-b"]  # every job ended elsewhere
    assert sum(j.submissions - 1 for j in report.jobs) >= 1
    assert killed in {j.scene_id for j in report.jobs}
    assert report.seconds < 60
