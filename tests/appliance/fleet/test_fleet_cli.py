"""The fleet CLI against a real mosquitto and three real daemons on this machine.

``fleet status`` reads every node from its retained messages and marks one that was
killed (the broker's last will); ``fleet query`` merges the answers of three nodes into
one top-k and names one that is stopped (SIGSTOP: connected, silent); ``fleet install``
rolls a bundle served by a real HTTP server to three nodes and stops when the canary
refuses a tampered copy."""

from __future__ import annotations

import json
import os
import signal
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from typer.testing import CliRunner, Result

from appliance.cli.main import app as cli
from appliance.model.install import manifest_digest
from tests.conftest import Broker
from tests.helpers.colour_bundle import EMBED_DIM, versioned_copy
from tests.helpers.daemon import DaemonProc
from tests.helpers.http_files import FileServer
from tests.helpers.mqtt_listener import Listener
from tests.helpers.scenes import halves, quarters, write_scene

NODES = ("edge-a", "edge-b", "edge-c")
VECTOR = [1.0] * EMBED_DIM


class Fleet:
    """Three daemons on one broker, each with its own node id and root."""

    def __init__(self, tmp_path: Path, bundle: Path, broker: Broker) -> None:
        self.port = broker.port
        self.listener = Listener(broker.port, "terratile/#")
        self.boxes = {n: DaemonProc(tmp_path / n, bundle, broker.port, node_id=n,
                                    adapt={"enabled": False}) for n in NODES}

    def start(self) -> None:
        for box in self.boxes.values():
            box.start()
        for node in NODES:
            self.wait_listening(node)

    def wait_listening(self, node: str) -> None:
        """Until ``node`` surely takes requests: its subscriptions go out before
        ``online``, and stats published two ticks later follow them in order."""
        p = f"terratile/{node}"
        self.listener.wait_for(lambda m: m.topic == f"{p}/available" and m.payload == b"online")
        seen = len(self.listener.matching(lambda m: m.topic == f"{p}/stats"))
        self.listener.wait_for(lambda m: m.topic == f"{p}/stats", count=seen + 2)

    def close(self) -> None:
        self.listener.close()
        for box in self.boxes.values():
            if box.proc is not None:
                os.kill(box.proc.pid, signal.SIGCONT)  # a stopped one must be able to die
                box.kill()


@pytest.fixture()
def fleet(tmp_path: Path, colour_bundle: Path, broker: Broker) -> Iterator[Fleet]:
    f = Fleet(tmp_path, colour_bundle, broker)
    try:
        f.start()
        yield f
    finally:
        f.close()


def run_cli(fleet: Fleet, *args: str) -> Result:
    return CliRunner().invoke(cli, ["fleet", *args, "--config",
                                    str(fleet.boxes["edge-a"].config)])


def test_status_lists_every_node_and_marks_a_killed_one_offline(fleet: Fleet) -> None:
    out = run_cli(fleet, "status", "--json")
    assert out.exit_code == 0, out.output
    nodes = {n["node_id"]: n for n in json.loads(out.stdout)["nodes"]}
    assert sorted(nodes) == list(NODES)
    for n in nodes.values():
        assert n["available"] == "online" and n["state"] == "ready"
        assert n["model"]["name"] == "colour-test" and n["model"]["version"] == 1
        assert n["queue_depth"] == 0 and n["outbox_depth"] == 0 and n["degraded"] == []
        assert n["last_seen"] and n["status_error"] is None

    fleet.boxes["edge-b"].kill()  # SIGKILL: no goodbye, the broker publishes the will
    fleet.listener.wait_for(lambda m: m.topic == "terratile/edge-b/available"
                            and m.payload == b"offline")
    out = run_cli(fleet, "status", "--json")
    assert out.exit_code == 0, out.output
    nodes = {n["node_id"]: n for n in json.loads(out.stdout)["nodes"]}
    assert {n: v["available"] for n, v in nodes.items()} == {
        "edge-a": "online", "edge-b": "offline", "edge-c": "online"}
    assert nodes["edge-b"]["model"]["version"] == 1  # its last word, still retained

    table = run_cli(fleet, "status")
    assert table.exit_code == 0, table.output
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    assert rows["edge-b"][1] == "offline" and rows["edge-a"][1] == "online"
    assert "colour-test" in rows["edge-c"]


def ask_one(fleet: Fleet, node: str, request: dict[str, Any]) -> list[dict[str, Any]]:
    """One node's own answer, asked directly over MQTT 5."""
    reply_to = f"test-replies/{node}"
    probe = Listener(fleet.port, reply_to)
    try:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_to
        probe.publish(f"terratile/{node}/retrieval/query", json.dumps(request),
                      properties=props)
        reply = json.loads(probe.wait_for(lambda m: m.topic == reply_to)[0].payload)
    finally:
        probe.close()
    assert "error" not in reply, reply
    return list(reply["results"])


def is_result(node: str) -> Any:
    return lambda m: m.topic.startswith(f"terratile/{node}/scene/") and \
        m.topic.endswith("/result")


def test_query_merges_three_nodes_by_score_and_names_a_silent_one(
        fleet: Fleet, tmp_path: Path) -> None:
    layouts = {"edge-a": quarters(64, 64), "edge-b": halves(64, 64), "edge-c": None}
    for i, node in enumerate(NODES):
        scene = write_scene(tmp_path / f"{node}.tif", size=(64, 64), layout=layouts[node],
                            offset=float(3 * i))
        fleet.boxes[node].drop(scene)
    for node in NODES:
        fleet.listener.wait_for(is_result(node), timeout=120)

    everything = {"vector": VECTOR, "k": 100}
    own = {node: ask_one(fleet, node, everything) for node in NODES}
    union = sorted(((r["score"], node, r["id"]) for node in NODES for r in own[node]),
                   key=lambda t: -t[0])
    assert all(own.values())

    out = run_cli(fleet, "query", "--vector-file", str(vector_file(tmp_path)), "-k", "100",
                  "--json")
    assert out.exit_code == 0, out.output
    answer = json.loads(out.stdout)
    assert answer["asked"] == list(NODES) and answer["answered"] == list(NODES)
    assert answer["silent"] == [] and answer["errors"] == {} and not answer["partial"]
    merged = [(r["score"], r["node_id"], r["id"]) for r in answer["results"]]
    assert sorted(merged) == sorted(union)  # every node's every result, each naming it
    assert [s for s, _, _ in merged] == [s for s, _, _ in union]  # best first

    out = run_cli(fleet, "query", "--vector-file", str(vector_file(tmp_path)), "-k", "5",
                  "--json")
    top = [(r["score"], r["node_id"], r["id"]) for r in json.loads(out.stdout)["results"]]
    assert [s for s, _, _ in top] == [s for s, _, _ in union[:5]]
    assert set(top) <= set(union)

    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([1.0] * (EMBED_DIM + 1)))
    out = run_cli(fleet, "query", "--vector-file", str(wrong), "--json")
    assert out.exit_code == 1  # every node answered, none with results
    answer = json.loads(out.stdout)
    assert sorted(answer["errors"]) == list(NODES) and answer["results"] == []
    assert {e["code"] for e in answer["errors"].values()} == {"bad-request"}
    assert "error from edge-b (bad-request)" in out.stderr

    stopped = fleet.boxes["edge-c"]
    assert stopped.proc is not None
    os.kill(stopped.proc.pid, signal.SIGSTOP)  # connected (still "online"), but silent
    out = run_cli(fleet, "query", "--vector-file", str(vector_file(tmp_path)), "-k", "100",
                  "--timeout", "3", "--json")
    assert out.exit_code == 0, out.output
    answer = json.loads(out.stdout)
    assert answer["asked"] == list(NODES) and answer["answered"] == ["edge-a", "edge-b"]
    assert answer["silent"] == ["edge-c"] and answer["partial"]
    assert {r["node_id"] for r in answer["results"]} == {"edge-a", "edge-b"}
    assert len(answer["results"]) == len(own["edge-a"]) + len(own["edge-b"])
    assert "silent: edge-c did not answer within 3 s" in out.stderr

    table = run_cli(fleet, "query", "--vector-file", str(vector_file(tmp_path)), "-k", "3",
                    "--timeout", "2")
    assert table.exit_code == 0, table.output
    lines = table.stdout.splitlines()
    assert len(lines) == 3 and all(line.split()[2] in ("edge-a", "edge-b") for line in lines)
    assert "silent: edge-c" in table.stderr


def vector_file(tmp_path: Path) -> Path:
    path = tmp_path / "q.json"
    path.write_text(json.dumps(VECTOR))
    return path


def archive(bundle: Path, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tar:
        tar.add(bundle, arcname=bundle.name)
    return out


def active_version(box: DaemonProc) -> int:
    return int(json.loads((box.root / "state" / "models" / "ACTIVE").read_text())["version"])


def test_install_rolls_out_to_three_nodes_and_stops_at_a_canary_refusal(
        fleet: Fleet, colour_bundle: Path, tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    v2 = versioned_copy(colour_bundle, tmp_path / "v2", 2, 1, head_bias=6.0)
    archive(v2, served / "v2.tar.gz")
    v3 = versioned_copy(colour_bundle, tmp_path / "v3", 3, 2)
    digest3 = manifest_digest(v3)  # the genuine v3's digest ...
    (v3 / "classifier.onnx").write_bytes(b"tampered")  # ... of a copy changed on the way
    archive(v3, served / "v3.tar.gz")

    with FileServer(served) as server:
        out = run_cli(fleet, "install", server.url("v2.tar.gz"), "--nodes", "edge-a,edge-z")
        assert out.exit_code == 1 and "edge-z (unknown)" in out.stderr
        assert "nothing was sent" in out.stderr and server.requests == []

        out = run_cli(fleet, "install", server.url("v2.tar.gz"), "--sha256",
                      manifest_digest(v2), "--canary", "1", "--timeout", "120", "--json")
        assert out.exit_code == 0, out.output
        report = json.loads(out.stdout)
        assert report["complete"] and report["stopped"] is None
        assert [n["node_id"] for n in report["nodes"]] == list(NODES)
        assert {n["outcome"] for n in report["nodes"]} == {"installed"}
        assert {n["model"]["version"] for n in report["nodes"]} == {2}
        assert {active_version(b) for b in fleet.boxes.values()} == {2}
        assert server.requests.count("/v2.tar.gz") == 3  # each node fetched it itself

        out = run_cli(fleet, "install", server.url("v3.tar.gz"), "--sha256", digest3,
                      "--nodes", "edge-b,edge-a,edge-c", "--canary", "1", "--timeout", "120",
                      "--json")
        assert out.exit_code == 1, out.output
        report = json.loads(out.stdout)
        by_node = {n["node_id"]: n for n in report["nodes"]}
        assert [n["node_id"] for n in report["nodes"]] == ["edge-b", "edge-a", "edge-c"]
        assert by_node["edge-b"]["outcome"] == "refused"
        assert "sha256 mismatch for classifier.onnx" in by_node["edge-b"]["reason"]
        assert report["stopped"].startswith("edge-b: refused")
        assert by_node["edge-a"]["outcome"] == by_node["edge-c"]["outcome"] == "not-sent"
        assert {n["model"]["version"] for n in report["nodes"]} == {2}
        assert server.requests.count("/v3.tar.gz") == 1  # only the canary was asked
        assert {active_version(b) for b in fleet.boxes.values()} == {2}
        assert "stopped at edge-b: refused" in out.stderr
    refusals = fleet.listener.matching(lambda m: m.topic.endswith("/events/model")
                                       and json.loads(m.payload)["action"] == "refused")
    assert [m.topic.split("/")[1] for m in refusals] == ["edge-b"]


def broker_config(tmp_path: Path, port: int) -> Path:
    """A config for the fleet commands alone: the broker, nothing local."""
    path = tmp_path / "fleet.yaml"
    path.write_text(f"mqtt:\n  port: {port}\n")
    return path


def test_unreadable_status_and_unreachable_broker_are_reported(
        tmp_path: Path, broker: Broker) -> None:
    config = broker_config(tmp_path, broker.port)
    writer = Listener(broker.port, "unused/#")
    try:
        writer.publish("terratile/odd/status", '{"schema": "terratile.status/9"}', retain=True)
        writer.publish("terratile/odd/available", "online", retain=True)
    finally:
        writer.close()
    out = CliRunner().invoke(cli, ["fleet", "status", "--json", "--config", str(config)])
    assert out.exit_code == 0, out.output
    [node] = json.loads(out.stdout)["nodes"]
    assert node["node_id"] == "odd" and node["available"] == "online"
    assert node["state"] is None and "unreadable status" in node["status_error"]

    broker.stop()
    for args in (["status"], ["query", "--vector-file", str(vector_file(tmp_path))],
                 ["install", "http://127.0.0.1:9/b.tar.gz"]):
        out = CliRunner().invoke(cli, ["fleet", *args, "--config", str(config)])
        assert out.exit_code == 1, args
        assert f"cannot connect to the broker 127.0.0.1:{broker.port}" in out.stderr, args
