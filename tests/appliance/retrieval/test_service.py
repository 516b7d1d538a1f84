"""RetrievalService: request validation, image/cell/vector queries, and MQTT request/response
through a real mosquitto and the real Comms."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from PIL import Image

from appliance.comms.mqtt import Comms
from appliance.config import InputConfig, MQTTConfig, RetrievalConfig
from appliance.contract.bundle import load_bundle
from appliance.ingest.journal import Journal
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.retrieval.index import TileIndex
from appliance.retrieval.query import RESPONSE_SCHEMA
from appliance.retrieval.references import add_reference_images
from appliance.retrieval.service import RetrievalService
from tests.conftest import Broker
from tests.helpers.colour_bundle import EMBED_DIM, PURE
from tests.helpers.mqtt_listener import Listener
from tests.helpers.outcomes import CLASSES, outcome


@pytest.fixture(scope="module")
def runtime(colour_bundle: Path) -> ModelRuntime:
    return ModelRuntime(load_bundle(colour_bundle), ProviderPlan(providers=("cpu",)))


def paint(path: Path, colour: tuple[int, int, int], size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


@pytest.fixture()
def service(tmp_path: Path, runtime: ModelRuntime) -> RetrievalService:
    """An index holding two synthetic scenes plus one reference chip per pure colour."""
    allowed = tmp_path / "queries"
    cfg = RetrievalConfig(allowed_dirs=[allowed], max_k=50)
    index = TileIndex(tmp_path / "state", cfg, EMBED_DIM)
    for s in range(2):
        index.add_scene(outcome(f"s{s}", seed=s, dim=EMBED_DIM), CLASSES)
    refs = tmp_path / "refs"
    for name, colour in PURE.items():
        paint(refs / name / f"{name}.png", colour)
    add_reference_images(refs, index, runtime, InputConfig())
    return RetrievalService(index, cfg, lambda: runtime, "n1", InputConfig())


def ask(service: RetrievalService, request: Any) -> dict[str, Any]:
    raw = request if isinstance(request, bytes) else json.dumps(request).encode()
    reply = service.handle_request(raw)
    json.dumps(reply)  # always JSON-able
    assert reply["schema"] == RESPONSE_SCHEMA
    return reply


def error(reply: dict[str, Any]) -> str:
    assert "results" not in reply, reply
    return str(reply["error"]["code"])


def test_image_query_inside_allowed_dir(service: RetrievalService, tmp_path: Path) -> None:
    image = paint(tmp_path / "queries" / "red.jpg", (210, 25, 35))
    reply = ask(service, {"request_id": "r1", "image": str(image), "k": 3})
    assert reply["request_id"] == "r1" and reply["node_id"] == "n1"
    top = reply["results"][0]
    assert top["class"] == "urban" and top["source"] == "urban/urban.png"
    assert top["scene_id"].startswith("ref:") and top["score"] > 0.99
    assert {"score", "source", "scene_id", "bounds", "class"} <= set(top)


def test_cell_query_by_pixel_and_lonlat(service: RetrievalService) -> None:
    by_pixel = ask(service, {"scene_id": "s0", "pixel": [20, 17], "k": 5})
    assert len(by_pixel["results"]) == 5
    assert all(r["window"] != [16, 16, 16, 16] or r["scene_id"] != "s0"
               for r in by_pixel["results"])  # the query cell itself is left out
    by_lonlat = ask(service, {"scene_id": "s1", "lonlat": [10.0041, 44.9959], "k": 2,
                              "filters": {"scene_id": "s0"}})
    assert {r["scene_id"] for r in by_lonlat["results"]} == {"s0"}


def test_vector_query_with_filters(service: RetrievalService) -> None:
    vec = [1.0] + [0.0] * (EMBED_DIM - 1)
    reply = ask(service, {"vector": vec, "k": 50, "filters": {"class": "water"}})
    assert reply["results"] and {r["class"] for r in reply["results"]} == {"water"}
    future = ask(service, {"vector": vec, "filters": {"since": "2999-01-01T00:00:00Z"}})
    assert future["results"] == []


@pytest.mark.parametrize(("request_", "code"), [
    (b"{not json", "bad-json"),
    (b"\xff\xfe", "bad-json"),
    (b"[1, 2]", "bad-json"),
    ({"vector": [1, 0, 0, 0, 0, 0], "k": 0}, "bad-request"),
    ({"vector": [1, 0, 0, 0, 0, 0], "k": 51}, "bad-request"),
    ({"vector": [1, 0, 0, 0, 0, 0], "k": "5"}, "bad-request"),
    ({"vector": [1, 0, 0, 0, 0, 0], "k": True}, "bad-request"),
    ({"vector": [1, 0, 0]}, "bad-request"),
    ({"vector": [0, 0, 0, 0, 0, 0]}, "bad-request"),
    ({"vector": ["a", 0, 0, 0, 0, 0]}, "bad-request"),
    ({"vector": [1, 0, 0, 0, 0, 0], "image": "/x.png"}, "bad-request"),
    ({}, "bad-request"),
    ({"vector": [1, 0, 0, 0, 0, 0], "colour": "red"}, "bad-request"),
    ({"vector": [1, 0, 0, 0, 0, 0], "filters": {"since": "yesterday"}}, "bad-request"),
    ({"vector": [1, 0, 0, 0, 0, 0], "filters": {"planet": "mars"}}, "bad-request"),
    ({"vector": [1, 0, 0, 0, 0, 0], "request_id": "a/b"}, "bad-request"),
    ({"vector": [1, 0, 0, 0, 0, 0], "request_id": "x" * 129}, "bad-request"),
    ({"vector": [1, 0, 0, 0, 0, 0], "request_id": "nul\u0000"}, "bad-request"),
    ({"vector": [1, 0, 0, 0, 0, 0], "request_id": ""}, "bad-request"),
    ({"vector": [1, 0, 0, 0, 0, 0], "request_id": 7}, "bad-request"),
    ({"scene_id": "nope", "pixel": [1, 1]}, "unknown-scene"),
    ({"scene_id": "s0", "pixel": [9999, 9999]}, "no-cell"),
    ({"scene_id": "s0"}, "bad-request"),
    ({"scene_id": "s0", "pixel": [1]}, "bad-request"),
])
def test_bad_requests_get_error_replies(service: RetrievalService, request_: Any,
                                        code: str) -> None:
    assert error(ask(service, request_)) == code


def test_paths_outside_allowed_dirs_are_forbidden(service: RetrievalService,
                                                  tmp_path: Path) -> None:
    outside = paint(tmp_path / "private" / "secret.png", (0, 0, 0))
    inside = tmp_path / "queries"
    inside.mkdir(exist_ok=True)
    (inside / "link.png").symlink_to(outside)
    for path in [outside, inside / ".." / "private" / "secret.png", inside / "link.png",
                 Path("/etc/passwd"), tmp_path / "queries-evil" / "x.png"]:
        assert error(ask(service, {"image": str(path)})) == "forbidden-path", path
    assert error(ask(service, {"image": str(inside / "missing.png")})) == "not-found"
    (inside / "notes.txt").write_text("hello")
    assert error(ask(service, {"image": str(inside / "notes.txt")})) == "bad-image"
    (inside / "broken.png").write_bytes(b"\x89PNG broken")
    assert error(ask(service, {"image": str(inside / "broken.png")})) == "bad-image"


def test_no_model_means_image_queries_error(service: RetrievalService, tmp_path: Path) -> None:
    service.runtime = lambda: None
    image = paint(tmp_path / "queries" / "q.png", (0, 0, 200))
    assert error(ask(service, {"image": str(image)})) == "no-model"
    assert "results" in ask(service, {"vector": [1, 0, 0, 0, 0, 0]})


@pytest.fixture()
def comms(broker: Broker, tmp_path: Path, service: RetrievalService) -> Any:
    c = Comms(MQTTConfig(port=broker.port, reconnect_max_delay=1), "n1",
              Journal(tmp_path / "journal.sqlite"), lambda: "{}")
    c.on_request("retrieval/query", service.handle_request)
    c.start()
    assert c.connected.wait(10)
    # The request subscription is made on connect; probe until it answers.
    probe = Listener(broker.port, "terratile/n1/retrieval/response/probe")
    for _ in range(50):
        probe.publish("terratile/n1/retrieval/query", '{"request_id": "probe", "k": 1}')
        try:
            probe.wait_for(lambda m: True, timeout=0.2)
            break
        except TimeoutError:
            continue
    probe.close()
    yield c
    c.stop()


def test_mqtt5_request_gets_reply_on_response_topic(comms: Comms, broker: Broker) -> None:
    reply_topic = f"client/{uuid.uuid4().hex}/reply"
    listener = Listener(broker.port, reply_topic, "terratile/n1/retrieval/response/#")
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = reply_topic
    props.CorrelationData = b"corr-42"
    listener.publish("terratile/n1/retrieval/query",
                     json.dumps({"vector": [0, 0, 1, 0, 0, 0], "k": 4}), properties=props)
    got = listener.wait_for(lambda m: m.topic == reply_topic)[0]
    assert got.properties.CorrelationData == b"corr-42"
    body = json.loads(got.payload)
    assert body["schema"] == RESPONSE_SCHEMA and len(body["results"]) == 4
    # A bad request on the same path gets an error reply, with its correlation data.
    props.CorrelationData = b"corr-43"
    listener.publish("terratile/n1/retrieval/query", "{oops", properties=props)
    bad = listener.wait_for(lambda m: m.topic == reply_topic, count=2)[1]
    assert bad.properties.CorrelationData == b"corr-43"
    assert json.loads(bad.payload)["error"]["code"] == "bad-json"
    listener.close()


def test_mqtt311_style_request_gets_reply_on_request_id_topic(comms: Comms,
                                                              broker: Broker) -> None:
    listener = Listener(broker.port, "terratile/n1/retrieval/response/#")
    listener.publish("terratile/n1/retrieval/query",
                     json.dumps({"request_id": "q7", "scene_id": "ghost", "pixel": [0, 0]}))
    got = listener.wait_for(lambda m: m.topic == "terratile/n1/retrieval/response/q7")[0]
    body = json.loads(got.payload)
    assert body["request_id"] == "q7" and body["error"]["code"] == "unknown-scene"
    listener.close()


@pytest.mark.parametrize("bad_id", ["a/b", "all#", "x" * 129, "nul\u0000"])
def test_bad_request_id_gets_the_same_error_reply_either_way(comms: Comms, broker: Broker,
                                                             bad_id: str) -> None:
    """One validation of request_id (RetrievalService), whichever way the reply goes back:
    the MQTT 5 response topic, or ``<p>/retrieval/response`` for a 3.1.1 client whose id
    cannot name a topic (a client subscribed to ``response/#`` receives it)."""
    reply_topic = f"client/{uuid.uuid4().hex}/reply"
    listener = Listener(broker.port, reply_topic, "terratile/n1/retrieval/response/#")
    request = json.dumps({"request_id": bad_id, "vector": [0, 0, 1, 0, 0, 0]})
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = reply_topic
    props.CorrelationData = b"corr-bad"
    listener.publish("terratile/n1/retrieval/query", request, properties=props)
    listener.publish("terratile/n1/retrieval/query", request)
    v5 = listener.wait_for(lambda m: m.topic == reply_topic)[0]
    v311 = listener.wait_for(lambda m: m.topic == "terratile/n1/retrieval/response")[0]
    assert v5.properties.CorrelationData == b"corr-bad"
    bodies = [json.loads(v5.payload), json.loads(v311.payload)]
    for body in bodies:
        assert body["schema"] == RESPONSE_SCHEMA and "results" not in body
        assert body["request_id"] is None and body["error"]["code"] == "bad-request"
        assert "request_id" in body["error"]["message"]
    assert bodies[0]["error"] == bodies[1]["error"]
    listener.close()


def test_hostile_strings_and_nesting_are_bad_requests_not_internal(
        service: RetrievalService) -> None:
    """NUL and lone surrogates (JSON escapes) in a path or id, and nesting deeper than the
    parser recurses: ``bad-request``, never ``internal`` with a traceback."""
    for raw in (b'{"image": "/tmp/a\\u0000.png"}', b'{"image": "/tmp/\\ud800.png"}',
                b'{"scene_id": "s0\\u0000", "pixel": [0, 0]}',
                b'{"k": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"):
        reply = ask(service, raw)
        assert reply["error"]["code"] == "bad-request", (raw[:40], reply)


@pytest.mark.parametrize("code", ["busy", "rate-limited"])
def test_refusal_reply_keeps_a_small_requests_id(service: RetrievalService, code: Any) -> None:
    refused = service.refusal_reply(b'{"request_id": "q9", "vector": [1]}', code)
    assert refused["request_id"] == "q9" and refused["error"]["code"] == code
    assert refused["schema"] == RESPONSE_SCHEMA
    for raw in (b"{not json", b'{"request_id": "a/b"}', b"[" * 10_000,
                b'{"request_id": "big", "pad": "' + b"x" * 5000 + b'"}'):
        assert service.refusal_reply(raw, code)["request_id"] is None
