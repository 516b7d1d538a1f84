"""MQTT comms: one object owns the paho-mqtt (v2 API, MQTT 5) client.

What it guarantees:

* ``<p>/available`` is retained ``online`` while connected; the broker publishes the LWT
  ``offline`` if the box vanishes, and ``stop`` publishes it on a clean shutdown.
* ``<p>/status`` is retained and republished after every (re)connect, from a callable that
  always builds the current status, so a broker restart never leaves stale state behind.
* Reliable messages (scene results and failures, events) never go to paho directly: they
  are rows of a durable outbox (the journal's). A publisher thread hands each row to paho once per
  process lifetime, remembers ``mid → msg_id``, and deletes the row when the PUBACK comes
  back (``on_publish``). paho itself re-sends unacknowledged QoS 1 messages after a
  reconnect; after a daemon restart the surviving rows are published again with the same
  ``msg_id``. Delivery is therefore at least once, and duplicates are recognisable.
* ``<p>/stats`` is QoS 0 with a message expiry, skipped while disconnected.
* ``<p>/cmd/<verb>`` commands run registered handlers; retained commands are ignored so a
  stale retained ``cmd/rollback`` cannot fire on every restart.
* ``on_request(suffix, handler)`` answers on the MQTT 5 response topic with the request's
  correlation data, or on ``<p>/<base>/response/<request_id>`` for MQTT 3.1.1 clients. The
  handler alone parses and validates the payload; Comms never reads it, and takes the
  ``request_id`` for that topic from the handler's reply (``<p>/<base>/response`` when the
  reply has none, so an error about a missing or invalid id still reaches the client).

Handlers run on one worker thread, never on paho's network thread, so a slow handler
does not stall keep-alives. The password is read from a file and never logged.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from appliance.comms.message import Message, Outbox
from appliance.comms.topics import AVAILABLE, STATS, STATUS, Topics
from appliance.config import MQTTConfig

log = logging.getLogger(__name__)

CommandHandler = Callable[[bytes], None]
RequestHandler = Callable[[bytes], dict[str, Any]]


class Comms:
    """The MQTT side of the appliance; see the module docstring for the guarantees."""

    def __init__(self, cfg: MQTTConfig, node_id: str, outbox: Outbox,
                 status: Callable[[], str]) -> None:
        self.cfg = cfg
        self.node_id = node_id
        self.topics = Topics(cfg.topic_prefix, node_id)
        self.outbox = outbox
        self._status = status
        self.connected = threading.Event()
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._acks: queue.SimpleQueue[tuple[int, bool]] = queue.SimpleQueue()
        self._inflight: dict[int, str] = {}  # mid → msg_id; publisher thread only
        self._handed: set[str] = set()  # msg_ids given to paho in this process
        self._commands: dict[str, CommandHandler] = {}
        self._requests: dict[str, RequestHandler] = {}
        self._workers = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mqtt-handler")
        self._publisher: threading.Thread | None = None
        self.client_id = cfg.client_id or f"terratile-{node_id}"
        self.client = self._make_client()

    # -- topics and registration --------------------------------------------------------

    def on_command(self, verb: str, handler: CommandHandler) -> None:
        """Run ``handler(payload)`` for each non-retained message on ``<p>/cmd/<verb>``."""
        self._commands[verb] = handler

    def on_request(self, topic_suffix: str, handler: RequestHandler) -> None:
        """Answer requests on ``<p>/<topic_suffix>`` with ``handler(payload)`` as JSON.

        ``handler`` gets the raw payload and owns its parsing and validation. Its reply's
        ``request_id``, when a string, must already be a valid single topic level: without
        an MQTT 5 response topic the reply is published under it.
        """
        self._requests[topic_suffix] = handler
        if self.connected.is_set():
            self.client.subscribe(self.topics.node(topic_suffix), qos=1)

    # -- lifecycle ------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        cfg = self.cfg
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5)
        client.will_set(self.topics.node(AVAILABLE), "offline", qos=1, retain=True)
        if cfg.username:
            secret = cfg.password()
            client.username_pw_set(cfg.username,
                                   secret.get_secret_value() if secret is not None else None)
        if cfg.tls.enabled:
            client.tls_set(
                ca_certs=str(cfg.tls.ca_certs) if cfg.tls.ca_certs else None,
                certfile=str(cfg.tls.certfile) if cfg.tls.certfile else None,
                keyfile=str(cfg.tls.keyfile) if cfg.tls.keyfile else None,
            )
            client.tls_insecure_set(cfg.tls.insecure)
        client.reconnect_delay_set(min_delay=1, max_delay=cfg.reconnect_max_delay)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def start(self) -> None:
        """Connect in the background (retrying with backoff) and start the publisher."""
        log.info("MQTT: connecting to %s:%d as %s (tls=%s, user=%s)", self.cfg.host,
                 self.cfg.port, self.client_id, self.cfg.tls.enabled, self.cfg.username or "-")
        self.client.connect_async(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        self.client.loop_start()
        self._publisher = threading.Thread(target=self._drain, name="mqtt-outbox", daemon=True)
        self._publisher.start()

    def stop(self, drain_seconds: float = 2.0) -> None:
        """Flush the outbox briefly, publish ``offline``, disconnect."""
        self.wait_drained(drain_seconds)
        self._stopping.set()
        self._wake.set()
        if self._publisher is not None:
            self._publisher.join(timeout=5)
        if self.connected.is_set():
            info = self.client.publish(self.topics.node(AVAILABLE), "offline", qos=1, retain=True)
            info.wait_for_publish(timeout=2)
        self.client.disconnect()
        self.client.loop_stop()
        self._workers.shutdown(wait=False, cancel_futures=True)

    def wait_drained(self, timeout: float) -> bool:
        """Wait until the outbox is empty (or ``timeout``); True if it is."""
        deadline = time.monotonic() + timeout
        while self.outbox.outbox_depth() > 0:
            if time.monotonic() >= deadline or not self.connected.is_set():
                return False
            self._wake.set()
            time.sleep(0.05)
        return True

    # -- publishing ---------------------------------------------------------------------

    def kick(self) -> None:
        """New outbox rows exist: wake the publisher."""
        self._wake.set()

    def send(self, suffix: str, payload: str, msg_id: str) -> None:
        """Reliable (QoS 1, via the outbox) message on ``<p>/<suffix>``."""
        self.outbox.enqueue(Message(msg_id, self.topics.node(suffix), payload))
        self.kick()

    def publish_status(self) -> None:
        """Republish the retained status now (no-op while disconnected; on_connect does it)."""
        if self.connected.is_set():
            self.client.publish(self.topics.node(STATUS), self._status(), qos=1, retain=True)

    def publish_stats(self, payload: str) -> None:
        """QoS 0 with message expiry: stale stats are worthless, never queue them."""
        if not self.connected.is_set():
            return
        props = Properties(PacketTypes.PUBLISH)
        props.MessageExpiryInterval = self.cfg.stats_expiry
        self.client.publish(self.topics.node(STATS), payload, qos=0, properties=props)

    def _drain(self) -> None:
        """Publisher thread: outbox rows → paho; PUBACKs → row deletes."""
        while not self._stopping.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            self._settle_acks()
            if not self.connected.is_set():
                continue
            for m in self.outbox.pending(limit=100, exclude=self._handed):
                info = self.client.publish(m.topic, m.payload, qos=m.qos, retain=m.retain)
                if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                    log.warning("MQTT: publish of %s failed (%s); will retry", m.msg_id, info.rc)
                    continue
                # NO_CONN: paho keeps the QoS 1 message and sends it after reconnecting.
                self._inflight[info.mid] = m.msg_id
                self._handed.add(m.msg_id)
            self._settle_acks()

    def _settle_acks(self) -> None:
        """Delete the rows of every PUBACK received so far, in one transaction."""
        acked = []
        while True:
            try:
                mid, ok = self._acks.get_nowait()
            except queue.Empty:
                break
            msg_id = self._inflight.pop(mid, None)
            if msg_id is None:
                continue  # status, available, replies: not outbox rows
            if ok:
                acked.append(msg_id)
            else:
                log.error("MQTT: broker refused %s; it stays in the outbox until restart", msg_id)
        self.outbox.acknowledge(*acked)
        self._handed.difference_update(acked)

    # -- paho callbacks (network thread) ------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            log.error("MQTT: connection refused: %s", reason_code)
            return
        log.info("MQTT: connected to %s:%d", self.cfg.host, self.cfg.port)
        self.connected.set()
        client.publish(self.topics.node(AVAILABLE), "online", qos=1, retain=True)
        client.publish(self.topics.node(STATUS), self._status(), qos=1, retain=True)
        client.subscribe(self.topics.commands, qos=1)
        for suffix in self._requests:
            client.subscribe(self.topics.node(suffix), qos=1)
        self._wake.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        self.connected.clear()
        if not self._stopping.is_set():
            log.warning("MQTT: disconnected (%s); reconnecting with backoff", reason_code)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        self._acks.put((mid, not reason_code.is_failure))
        self._wake.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        verb = self.topics.verb(msg.topic)
        if verb is not None:
            if msg.retain:
                log.warning("MQTT: ignoring retained command %s", msg.topic)
                return
            command = self._commands.get(verb)
            if command is None:
                log.warning("MQTT: unknown command %r", verb)
                return
            log.info("MQTT: command %s", verb)
            self._workers.submit(_guarded, command, bytes(msg.payload))
            return
        for suffix, request in self._requests.items():
            if msg.topic == self.topics.node(suffix):
                self._workers.submit(self._answer, suffix, request, msg)
                return

    def _answer(self, suffix: str, handler: RequestHandler, msg: mqtt.MQTTMessage) -> None:
        """Run a request handler and publish its reply (see ``on_request`` for the topic)."""
        try:
            reply = handler(bytes(msg.payload))
        except Exception as exc:  # handlers should not raise; never lose the reply
            log.exception("MQTT: request handler for %s failed", suffix)
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        props_in = getattr(msg, "properties", None)
        response_topic = getattr(props_in, "ResponseTopic", None)
        props = Properties(PacketTypes.PUBLISH)
        correlation = getattr(props_in, "CorrelationData", None)
        if correlation is not None:
            props.CorrelationData = correlation
        if not response_topic:
            request_id = reply.get("request_id")
            response_topic = self.topics.response(
                suffix, request_id if isinstance(request_id, str) else None)
        self.client.publish(response_topic, json.dumps(reply), qos=1, properties=props)


def _guarded(handler: CommandHandler, payload: bytes) -> None:
    try:
        handler(payload)
    except Exception:
        log.exception("MQTT: command handler failed")
