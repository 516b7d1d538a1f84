"""Comms against a real mosquitto: outbox delivery and acks, outages, retained state,
commands, request/response, stats expiry, and password authentication."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.comms.message import Message
from appliance.comms.mqtt import Comms
from appliance.config import MQTTConfig
from appliance.ingest.journal import Journal
from tests.conftest import Broker
from tests.helpers.mqtt_listener import Listener, topic_is

P = "terratile/node-t"


def wait_until(cond: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


@pytest.fixture()
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "state" / "journal.sqlite")
    yield j
    j.close()


def make_comms(broker: Broker, journal: Journal, status: str = '{"state":"ready"}',
               **cfg: object) -> Comms:
    mcfg = MQTTConfig(port=broker.port, reconnect_max_delay=1, **cfg)  # type: ignore[arg-type]
    return Comms(mcfg, "node-t", journal, lambda: status)


def test_outbox_rows_are_delivered_and_deleted_on_ack(broker: Broker, journal: Journal) -> None:
    listener = Listener(broker.port, f"{P}/#")
    comms = make_comms(broker, journal)
    comms.start()
    try:
        for i in range(5):
            comms.send(f"scene/s{i}/result", json.dumps({"i": i}), msg_id=f"m{i}")
        got = listener.wait_for(lambda m: "/scene/" in m.topic, count=5)
        assert [json.loads(m.payload)["i"] for m in got] == [0, 1, 2, 3, 4]
        assert all(m.qos == 1 for m in got)
        wait_until(lambda: journal.outbox_depth() == 0)
        avail = listener.wait_for(topic_is(f"{P}/available"))
        assert avail[0].text() == "online"
        status = listener.wait_for(topic_is(f"{P}/status"))
        assert json.loads(status[0].payload) == {"state": "ready"}
    finally:
        comms.stop()
        listener.close()


def test_duplicate_msg_id_is_enqueued_once(journal: Journal) -> None:
    assert journal.enqueue(Message("same", "t", "a"))
    assert not journal.enqueue(Message("same", "t", "b"))
    assert [m.payload for m in journal.pending()] == ["a"]


def test_broker_outage_loses_nothing(broker: Broker, journal: Journal) -> None:
    comms = make_comms(broker, journal)
    comms.start()
    wait_until(comms.connected.is_set)
    broker.stop()
    wait_until(lambda: not comms.connected.is_set())
    try:
        for i in range(10):
            comms.send(f"scene/s{i}/result", json.dumps({"i": i}), msg_id=f"m{i}")
        time.sleep(0.5)
        assert journal.outbox_depth() == 10  # nothing acknowledged while the broker is down
        broker.start()
        listener = Listener(broker.port, f"{P}/scene/#")
        # The listener may subscribe after some were delivered; the outbox is the proof.
        wait_until(lambda: journal.outbox_depth() == 0, timeout=30)
        comms.send("scene/after/result", "{}", msg_id="after")
        listener.wait_for(topic_is(f"{P}/scene/after/result"))
        listener.close()
    finally:
        comms.stop()


def test_status_is_republished_after_reconnect(broker: Broker, journal: Journal) -> None:
    comms = make_comms(broker, journal, status='{"state":"v2"}')
    comms.start()
    try:
        wait_until(comms.connected.is_set)
        broker.stop()  # no persistence: the broker forgets every retained message
        broker.start()
        wait_until(comms.connected.is_set, timeout=30)
        listener = Listener(broker.port, f"{P}/status", f"{P}/available")
        status = listener.wait_for(topic_is(f"{P}/status"))
        assert status[0].retain and json.loads(status[0].payload) == {"state": "v2"}
        assert listener.wait_for(topic_is(f"{P}/available"))[0].text() == "online"
        listener.close()
    finally:
        comms.stop()


def test_clean_stop_publishes_offline(broker: Broker, journal: Journal) -> None:
    comms = make_comms(broker, journal)
    comms.start()
    wait_until(comms.connected.is_set)
    comms.stop()
    listener = Listener(broker.port, f"{P}/available")
    got = listener.wait_for(topic_is(f"{P}/available"))
    assert got[0].retain and got[0].text() == "offline"
    listener.close()


def test_retained_commands_are_ignored_live_ones_run(broker: Broker, journal: Journal,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    listener = Listener(broker.port, "unused/#")
    listener.publish(f"{P}/cmd/rescan", "stale", retain=True)
    calls: list[bytes] = []
    ran = threading.Event()
    comms = make_comms(broker, journal)
    comms.on_command("rescan", lambda payload: (calls.append(payload), ran.set()))
    comms.start()
    try:
        wait_until(comms.connected.is_set)
        wait_until(lambda: "ignoring retained command" in caplog.text)
        assert calls == []
        listener.publish(f"{P}/cmd/rescan", "live")
        assert ran.wait(10)
        assert calls == [b"live"]
    finally:
        comms.stop()
        listener.close()


def echo(payload: bytes) -> dict[str, object]:
    """A request handler that owns its payload: it parses it, and names the request_id."""
    request = json.loads(payload)
    return {"request_id": request.get("request_id"), "echo": request}


def test_request_reply_mqtt5_and_request_id(broker: Broker, journal: Journal) -> None:
    comms = make_comms(broker, journal)
    comms.on_request("retrieval/query", echo)
    comms.start()
    listener = Listener(broker.port, "replies/#", f"{P}/retrieval/response/#")
    try:
        wait_until(comms.connected.is_set)
        time.sleep(0.2)
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "replies/me"
        props.CorrelationData = b"corr-1"
        listener.publish(f"{P}/retrieval/query", '{"k": 3}', properties=props)
        reply = listener.wait_for(topic_is("replies/me"))[0]
        assert json.loads(reply.payload) == {"request_id": None, "echo": {"k": 3}}
        assert reply.properties.CorrelationData == b"corr-1"
        listener.publish(f"{P}/retrieval/query", '{"request_id": "r7", "k": 1}')
        legacy = listener.wait_for(topic_is(f"{P}/retrieval/response/r7"))[0]
        assert json.loads(legacy.payload)["echo"]["request_id"] == "r7"
    finally:
        comms.stop()
        listener.close()


def test_fallback_topic_comes_from_the_handlers_reply(broker: Broker, journal: Journal) -> None:
    """Comms never parses a request: the 3.1.1 reply topic is the handler's ``request_id``,
    and a reply without one goes to ``<base>/response`` (seen under ``response/#``)."""
    seen: list[bytes] = []

    def handler(payload: bytes) -> dict[str, object]:
        seen.append(payload)
        return {"request_id": "from-handler" if payload == b"named" else None}

    comms = make_comms(broker, journal)
    comms.on_request("retrieval/query", handler)
    comms.start()
    listener = Listener(broker.port, f"{P}/retrieval/response/#")
    try:
        wait_until(comms.connected.is_set)
        time.sleep(0.2)
        listener.publish(f"{P}/retrieval/query", "named")  # not JSON: Comms must not care
        named = listener.wait_for(topic_is(f"{P}/retrieval/response/from-handler"))[0]
        assert json.loads(named.payload) == {"request_id": "from-handler"}
        listener.publish(f"{P}/retrieval/query", '{"request_id": "ignored-by-comms"}')
        anonymous = listener.wait_for(topic_is(f"{P}/retrieval/response"))[0]
        assert json.loads(anonymous.payload) == {"request_id": None}
        assert seen == [b"named", b'{"request_id": "ignored-by-comms"}']
        assert not [m for m in listener.messages if m.topic.endswith("ignored-by-comms")]
    finally:
        comms.stop()
        listener.close()


def test_stats_carry_message_expiry(broker: Broker, journal: Journal) -> None:
    comms = make_comms(broker, journal, stats_expiry=42)
    comms.start()
    listener = Listener(broker.port, f"{P}/stats")
    try:
        wait_until(comms.connected.is_set)
        comms.publish_stats('{"n": 1}')
        got = listener.wait_for(topic_is(f"{P}/stats"))[0]
        assert got.qos == 0
        assert 0 < got.properties.MessageExpiryInterval <= 42
    finally:
        comms.stop()
        listener.close()


def test_password_from_file_authenticates_and_is_never_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    secret = "s3cret-Pa55"
    pwfile = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pwfile), "edge", secret], check=True)
    broker = Broker(tmp_path)
    broker.conf.write_text(broker.conf.read_text().replace(
        "allow_anonymous true", f"allow_anonymous false\npassword_file {pwfile}\n"
        # As root, mosquitto would drop to its own user, which cannot read pytest's tmp.
        + ("user root" if os.geteuid() == 0 else "")))
    (tmp_path / "mqtt_password").write_text(secret + "\n")
    broker.start()
    journal = Journal(tmp_path / "j.sqlite")
    try:
        with caplog.at_level(logging.DEBUG):
            good = make_comms(broker, journal, username="edge",
                              password_file=tmp_path / "mqtt_password")
            good.start()
            wait_until(good.connected.is_set)
            good.stop()
            (tmp_path / "wrong").write_text("nope")
            bad = make_comms(broker, journal, username="edge", password_file=tmp_path / "wrong")
            bad.start()
            time.sleep(1.0)
            assert not bad.connected.is_set()
            bad.stop()
        assert secret not in caplog.text
        assert "MQTT: connection refused" in caplog.text
    finally:
        journal.close()
        broker.stop()


def test_tls_with_a_private_ca(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Comms verifies the broker against ``tls.ca_certs`` and delivers over TLS."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed; needed to make a test CA")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=tmp_path)

    def key_and_cert(*args: str) -> None:  # EC keys: fast to generate
        run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", *args)

    key_and_cert("-x509", "-days", "1", "-subj", "/CN=test-ca", "-keyout", "ca.key",
                 "-out", "ca.crt")
    key_and_cert("-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr")
    (tmp_path / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", "server.crt")
    broker = Broker(tmp_path)
    broker.conf.write_text(broker.conf.read_text() + (
        f"cafile {tmp_path / 'ca.crt'}\ncertfile {tmp_path / 'server.crt'}\n"
        f"keyfile {tmp_path / 'server.key'}\n" + ("user root\n" if os.geteuid() == 0 else "")))
    broker.start()
    journal = Journal(tmp_path / "j.sqlite")
    try:
        comms = make_comms(broker, journal, tls={"enabled": True,
                                                 "ca_certs": tmp_path / "ca.crt"})
        comms.start()
        wait_until(comms.connected.is_set)
        comms.send("scene/x/result", "{}", msg_id="tls-1")
        wait_until(lambda: journal.outbox_depth() == 0)
        comms.stop()
        other_ca = tmp_path / "other"
        other_ca.mkdir()
        key_and_cert("-x509", "-days", "1", "-subj", "/CN=x", "-keyout", "other/ca.key",
                     "-out", "other/ca.crt")
        untrusting = make_comms(broker, journal, tls={"enabled": True,
                                                      "ca_certs": other_ca / "ca.crt"})
        untrusting.start()
        time.sleep(1.0)
        assert not untrusting.connected.is_set()  # the broker's certificate is not trusted
        assert "CERTIFICATE_VERIFY_FAILED" in caplog.text  # and the reason is logged
        untrusting.stop()
    finally:
        journal.close()
        broker.stop()
