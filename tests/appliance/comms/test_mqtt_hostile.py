"""Comms against hostile or failing MQTT, with a real mosquitto: forged response topics,
request floods, retained requests, ACL denials, TLS against a plain port (issue 16)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.comms.mqtt import Comms
from appliance.config import MQTTConfig
from appliance.ingest.journal import Journal
from tests.appliance.comms.test_mqtt import P, echo, journal, make_comms, wait_until
from tests.conftest import Broker
from tests.helpers.mqtt_listener import Listener, topic_is

__all__ = ["journal"]  # the fixture, re-used


def ask(listener: Listener, payload: str, response_topic: str | None = None,
        correlation: bytes | None = None) -> None:
    props = None
    if response_topic is not None or correlation is not None:
        props = Properties(PacketTypes.PUBLISH)
        if response_topic is not None:
            props.ResponseTopic = response_topic
        if correlation is not None:
            props.CorrelationData = correlation
    listener.publish(f"{P}/retrieval/query", payload, properties=props)


HOSTILE_TOPICS = [f"{P}/cmd/adapt", f"{P}/scene/forged/result", f"{P}/available",
                  "terratile/other-node/cmd/reload", "replies/+", "replies/#",
                  "$SYS/forged", "r" * 65_000]


def test_forged_response_topics_are_refused_and_answered_on_the_default_topic(
        broker: Broker, journal: Journal, caplog: pytest.LogCaptureFixture) -> None:
    adapted = threading.Event()
    comms = make_comms(broker, journal)
    comms.on_command("adapt", lambda _payload: adapted.set())
    comms.on_request("retrieval/query", echo)
    comms.start()
    listener = Listener(broker.port, "#")
    try:
        wait_until(comms.connected.is_set)
        time.sleep(0.2)
        for i, topic in enumerate(HOSTILE_TOPICS):
            ask(listener, json.dumps({"request_id": f"h{i}"}), response_topic=topic,
                correlation=f"c{i}".encode())
        for i in range(len(HOSTILE_TOPICS)):
            got = listener.wait_for(topic_is(f"{P}/retrieval/response/h{i}"))[0]
            assert got.properties.CorrelationData == f"c{i}".encode()
        time.sleep(0.3)
        assert not adapted.is_set()  # the reply was not run as a command
        replies = {m.topic for m in listener.messages if b'"echo"' in m.payload}
        assert replies == {f"{P}/retrieval/response/h{i}" for i in range(len(HOSTILE_TOPICS))}
        refusals = [r.getMessage() for r in caplog.records if "refusing response" in r.message]
        assert len(refusals) == len(HOSTILE_TOPICS)
        assert any("inside the appliance tree" in r for r in refusals)
        assert any("wildcard" in r for r in refusals) and any("longer than" in r for r in refusals)
        # A legitimate response topic still works.
        ask(listener, '{"request_id": "ok"}', response_topic="replies/me")
        assert json.loads(listener.wait_for(topic_is("replies/me"))[0].payload)["echo"] == {
            "request_id": "ok"}
    finally:
        comms.stop()
        listener.close()


def test_a_flood_of_requests_gets_busy_and_commands_still_run_at_once(
        broker: Broker, journal: Journal) -> None:
    release = threading.Event()
    answered: list[bytes] = []

    def slow(payload: bytes) -> dict[str, object]:
        release.wait(30)
        answered.append(payload)
        return echo(payload)

    ran = threading.Event()
    comms = make_comms(broker, journal, max_pending_requests=4)
    comms.on_request("retrieval/query", slow)
    comms.on_command("reload", lambda _payload: ran.set())
    comms.start()
    listener = Listener(broker.port, f"{P}/retrieval/response/#")
    try:
        wait_until(comms.connected.is_set)
        time.sleep(0.2)
        for i in range(40):
            ask(listener, json.dumps({"request_id": f"q{i}"}))
        busy = listener.wait_for(lambda m: b'"busy"' in m.payload, count=36, timeout=10)
        assert len(busy) == 36 and comms.pending_requests == 4
        sent = time.monotonic()
        listener.publish(f"{P}/cmd/reload", "{}")
        assert ran.wait(5), "a command waited behind the queued requests"
        assert time.monotonic() - sent < 2.0
        release.set()
        listener.wait_for(lambda m: b'"echo"' in m.payload, count=4)
        assert len(answered) == 4
        wait_until(lambda: comms.pending_requests == 0)
    finally:
        release.set()
        comms.stop()
        listener.close()


def test_a_client_over_its_rate_is_refused_while_another_is_answered(
        broker: Broker, journal: Journal) -> None:
    comms = make_comms(broker, journal, client_rate=0.01, client_burst=3)
    comms.on_request("retrieval/query", echo)
    comms.start()
    listener = Listener(broker.port, "replies/#")
    try:
        wait_until(comms.connected.is_set)
        time.sleep(0.2)
        for i in range(10):
            ask(listener, json.dumps({"request_id": f"n{i}"}), response_topic="replies/noisy")
        ask(listener, json.dumps({"request_id": "q1"}), response_topic="replies/quiet")
        noisy = listener.wait_for(topic_is("replies/noisy"), count=10)
        codes = [json.loads(m.payload).get("error", {}).get("code") for m in noisy]
        assert codes.count("rate-limited") == 7 and codes.count(None) == 3, codes
        quiet = listener.wait_for(topic_is("replies/quiet"))
        assert json.loads(quiet[0].payload) == {"request_id": "q1",
                                                "echo": {"request_id": "q1"}}
    finally:
        comms.stop()
        listener.close()


def test_retained_requests_are_ignored(broker: Broker, journal: Journal,
                                       caplog: pytest.LogCaptureFixture) -> None:
    listener = Listener(broker.port, f"{P}/retrieval/response/#")
    listener.publish(f"{P}/retrieval/query", '{"request_id": "stale"}', retain=True)
    comms = make_comms(broker, journal)
    comms.on_request("retrieval/query", echo)
    comms.start()
    try:
        wait_until(lambda: "ignoring retained request" in caplog.text)
        ask(listener, '{"request_id": "live"}')
        listener.wait_for(topic_is(f"{P}/retrieval/response/live"))
        assert not listener.matching(topic_is(f"{P}/retrieval/response/stale"))
    finally:
        comms.stop()
        listener.close()


def restricted_broker(tmp_path: Path, extra: str) -> Broker:
    broker = Broker(tmp_path)
    broker.conf.write_text(broker.conf.read_text() + extra
                           + ("user root\n" if os.geteuid() == 0 else ""))
    return broker


BASE_ACL = (f"topic readwrite {P}/available\ntopic readwrite {P}/status\n"
            f"topic read {P}/cmd/#\n")
DYNSEC = Path("/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so")


def test_a_refused_subscription_is_logged_with_its_reason(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """mosquitto's acl_file never refuses a SUBSCRIBE (it filters delivery); its dynamic
    security plugin does, with SUBACK reason code 0x87."""
    if not DYNSEC.is_file():
        pytest.skip(f"{DYNSEC} not installed")
    (tmp_path / "dynsec.json").write_text(json.dumps({
        "defaultACLAccess": {"publishClientSend": True, "publishClientReceive": True,
                             "subscribe": True, "unsubscribe": True},
        "clients": [], "groups": [{"groupname": "anon", "roles": [{"rolename": "anon"}]}],
        "roles": [{"rolename": "anon", "acls": [{
            "acltype": "subscribePattern", "topic": f"{P}/retrieval/query", "priority": 0,
            "allow": False}]}],
        "anonymousGroup": "anon"}))
    broker = restricted_broker(tmp_path, f"plugin {DYNSEC}\n"
                               f"plugin_opt_config_file {tmp_path / 'dynsec.json'}\n")
    broker.start()
    journal = Journal(tmp_path / "j.sqlite")
    comms = make_comms(broker, journal)
    comms.on_request("retrieval/query", echo)
    try:
        comms.start()
        wait_until(lambda: "refused the subscription" in caplog.text)
        refused = [r.getMessage() for r in caplog.records if "refused the sub" in r.message]
        assert refused == [f"MQTT: broker refused the subscription to {P}/retrieval/query: "
                           "Not authorized"]
        link = comms.connection()  # the status shows it: degraded mqtt while connected
        assert link.connected and link.refused_subscriptions == [f"{P}/retrieval/query"]
    finally:
        comms.stop()
        journal.close()
        broker.stop()


def test_a_refused_publish_is_logged_and_retried_without_a_restart(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The ACL denies publishing results (PUBACK 0x87): logged with the reason and re-sent
    with backoff; once the ACL allows it, the row goes out in the same process."""
    (tmp_path / "acl").write_text(BASE_ACL)
    broker = restricted_broker(tmp_path, f"acl_file {tmp_path / 'acl'}\n")
    broker.start()
    journal = Journal(tmp_path / "j.sqlite")
    comms = make_comms(broker, journal, publish_retry_max_delay=1)
    try:
        comms.start()
        wait_until(comms.connected.is_set)
        comms.send("scene/s1/result", "{}", msg_id="denied-1")
        wait_until(lambda: caplog.text.count("broker refused denied-1 (Not authorized)") >= 2)
        assert journal.outbox_depth() == 1 and comms.connection().refused_messages == 1
        (tmp_path / "acl").write_text(BASE_ACL + f"topic write {P}/scene/#\n")
        assert broker.proc is not None
        broker.proc.send_signal(signal.SIGHUP)  # mosquitto re-reads its ACL file
        wait_until(lambda: journal.outbox_depth() == 0)
        assert comms.connection().refused_messages == 0
    finally:
        comms.stop()
        journal.close()
        broker.stop()


def test_tls_against_a_plain_port_is_logged(broker: Broker, journal: Journal,
                                             caplog: pytest.LogCaptureFixture) -> None:
    comms = make_comms(broker, journal, tls={"enabled": True})
    comms.start()
    try:
        wait_until(lambda: "MQTT: cannot connect" in caplog.text)
        assert not comms.connected.is_set()
        failure = next(r.getMessage() for r in caplog.records if "cannot connect" in r.message)
        # mosquitto drops the TLS hello on a plain listener: the reset is the reason logged.
        assert "tls=True" in failure and ("SSL" in failure or "ConnectionReset" in failure)
    finally:
        comms.stop()


def test_a_missing_ca_file_is_named(tmp_path: Path, journal: Journal) -> None:
    missing = tmp_path / "nowhere" / "ca.crt"
    cfg = MQTTConfig(tls={"enabled": True, "ca_certs": missing})  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError, match=str(missing)):
        Comms(cfg, "node-t", journal, lambda: "{}")
