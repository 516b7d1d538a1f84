"""MQTT comms: one object owns the paho-mqtt (v2 API, MQTT 5) client.

What it guarantees:

* ``<p>/available`` is retained ``online`` while connected, published after the box's
  subscriptions (so a client that sees it can send commands); the broker publishes the LWT
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
* A row the broker refuses (a PUBACK with a failure reason code, e.g. an ACL denial) is
  logged with the reason and re-sent with exponential backoff (1 s doubling up to
  ``mqtt.publish_retry_max_delay``), never left waiting for a restart.
* ``<p>/cmd/<verb>`` commands run registered handlers; retained commands are ignored so a
  stale retained ``cmd/rollback`` cannot fire on every restart. Retained requests are
  ignored alike (a retained query would otherwise be answered after every restart).
* ``on_request(suffix, handler)`` answers on the MQTT 5 response topic with the request's
  correlation data, or on ``<p>/<base>/response/<request_id>`` for MQTT 3.1.1 clients. The
  handler alone parses and validates the payload; Comms never reads it, and takes the
  ``request_id`` for that topic from the handler's reply (``<p>/<base>/response`` when the
  reply has none, so an error about a missing or invalid id still reaches the client).
  A response topic that ``Topics.response_topic_problem`` refuses (inside the
  ``<prefix>/`` tree, wildcards, control characters, ``$``, too long) is logged with the
  reason and the reply goes to that safe default topic instead.
* Every MQTT failure is logged: connect failures with the exception (TLS, refused,
  unreachable), refused CONNACKs, SUBACK failure reason codes, refused PUBACKs. While the
  broker cannot be reached a WARNING says for how long, after how many attempts, and how
  many messages wait in the outbox, repeated with backoff (``mqtt.down_warning_seconds``,
  doubling up to ``MAX_DOWN_WARNING`` s); ``connection()`` is that state for the status.

* ``take_jobs(topic, handler, …)`` (fleet nodes) subscribes to the fleet's shared work
  queue with a persistent session (``clean_start`` off, a session expiry) and an MQTT 5
  Receive Maximum, and turns paho's acknowledgements to manual: every other message is
  acknowledged on arrival as before, a job only when its handler has committed it and
  calls ``ack``. An acknowledgement of a delivery from an earlier connection is dropped
  (its packet id means nothing on the new one; the broker re-sends the job, DUP set).
  ``stop`` leaves the queue before it disconnects.

Handlers never run on paho's network thread, so a slow handler does not stall
keep-alives; the one exception is the job handler, which must only commit and return.
Commands have their own worker and are never queued behind requests. At most
``mqtt.max_pending_requests`` requests wait or run at once; beyond that a request is
answered ``busy`` (QoS 0) straight from the network thread (the ``busy`` callable given to
``on_request``, cheap by contract) instead of growing a queue. Before that, each client
(named by its reply topic, ``comms.rate_limit``) is held to ``mqtt.client_rate`` requests
per second and answered ``rate-limited`` beyond it, so one noisy client cannot take every
slot. The password is read from a file and never logged.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from appliance.comms.message import Message, Outbox
from appliance.comms.rate_limit import ClientRateLimit
from appliance.comms.topics import AVAILABLE, STATS, STATUS, Topics
from appliance.config import MQTTConfig
from appliance.contract.payloads import MqttStatus

log = logging.getLogger(__name__)

CommandHandler = Callable[[bytes], None]
RequestHandler = Callable[[bytes], dict[str, Any]]
Refusal = Literal["busy", "rate-limited"]
RefusalReply = Callable[[bytes, Refusal], dict[str, Any]]
MQTT311_CLIENTS = ""  # the one rate-limit bucket of clients without a response topic
FIRST_RETRY_DELAY = 1.0  # seconds before re-sending a refused outbox row, doubled each time
MAX_DOWN_WARNING = 600.0


REFUSAL_MESSAGES: dict[Refusal, str] = {
    "busy": "too many pending requests; retry later",
    "rate-limited": "this client sends requests faster than mqtt.client_rate; slow down",
}


def refusal_reply(payload: bytes, code: Refusal) -> dict[str, Any]:
    """The default refusal: Comms does not read the payload, so no request_id."""
    return {"request_id": None, "error": {"code": code, "message": REFUSAL_MESSAGES[code]}}


def broker_client(cfg: MQTTConfig, client_id: str) -> mqtt.Client:
    """An MQTT 5 client with ``cfg``'s credentials and TLS, not connected yet."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                         protocol=mqtt.MQTTv5)
    if cfg.username:
        secret = cfg.password()
        client.username_pw_set(cfg.username,
                               secret.get_secret_value() if secret is not None else None)
    if cfg.tls.enabled:
        for key in ("ca_certs", "certfile", "keyfile"):
            path = getattr(cfg.tls, key)
            if path is not None and not path.is_file():
                raise FileNotFoundError(f"mqtt.tls.{key}: {path} is not a readable file")
        client.tls_set(
            ca_certs=str(cfg.tls.ca_certs) if cfg.tls.ca_certs else None,
            certfile=str(cfg.tls.certfile) if cfg.tls.certfile else None,
            keyfile=str(cfg.tls.keyfile) if cfg.tls.keyfile else None,
        )
        client.tls_insecure_set(cfg.tls.insecure)
    return client


@dataclass(frozen=True)
class JobDelivery:
    """One job as the broker delivered it; ``Comms.ack`` it once it is committed."""

    payload: bytes
    mid: int
    qos: int
    dup: bool
    connection: int  # which connection delivered it: an ack is valid on that one only


JobHandler = Callable[[JobDelivery], None]


@dataclass(frozen=True)
class _JobQueue:
    topic: str  # the shared subscription
    delivered_on: str  # the topic its messages carry
    handler: JobHandler
    receive_maximum: int
    session_expiry: int


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
        self._acks: queue.SimpleQueue[tuple[int, ReasonCode | None]] = queue.SimpleQueue()
        self._inflight: dict[int, str] = {}  # mid → msg_id; publisher thread only
        self._handed: set[str] = set()  # msg_ids given to paho in this process
        self._retry: dict[str, float] = {}  # refused msg_id → last delay; publisher thread
        self._retry_due: dict[str, float] = {}  # refused msg_id → when to re-send it
        self._commands: dict[str, CommandHandler] = {}
        self._requests: dict[str, tuple[RequestHandler, RefusalReply]] = {}
        self._rate = ClientRateLimit(cfg.client_rate, cfg.client_burst)
        self._subscriptions: dict[int, str] = {}  # SUBSCRIBE mid → topic, for SUBACK logs
        self._command_worker = ThreadPoolExecutor(max_workers=1,
                                                  thread_name_prefix="mqtt-command")
        self._request_worker = ThreadPoolExecutor(max_workers=1,
                                                  thread_name_prefix="mqtt-request")
        self._pending = 0  # requests queued or running; guarded by _pending_lock
        self._pending_lock = threading.Lock()
        self._publisher: threading.Thread | None = None
        self._link_lock = threading.Lock()
        self._link = MqttStatus(connected=False, since=_now())
        self._link_listeners: list[Callable[[], None]] = []
        self._refused_subscriptions: set[str] = set()  # network thread
        self._next_down_warning = 0.0  # publisher thread
        self._down_warning_every = self.cfg.down_warning_seconds
        self._jobs: _JobQueue | None = None
        self._connection = 0  # counts connections made; network thread writes it
        self.client_id = cfg.client_id or f"terratile-{node_id}"
        self.client = self._make_client()

    # -- topics and registration --------------------------------------------------------

    def on_command(self, verb: str, handler: CommandHandler) -> None:
        """Run ``handler(payload)`` for each non-retained message on ``<p>/cmd/<verb>``."""
        self._commands[verb] = handler

    def on_request(self, topic_suffix: str, handler: RequestHandler,
                   refusal: RefusalReply = refusal_reply) -> None:
        """Answer requests on ``<p>/<topic_suffix>`` with ``handler(payload)`` as JSON.

        ``handler`` gets the raw payload and owns its parsing and validation. Its reply's
        ``request_id``, when a string, must already be a valid single topic level: without
        an MQTT 5 response topic the reply is published under it. ``refusal(payload, code)`` is
        the reply when the client is over its rate (``rate-limited``) or
        ``mqtt.max_pending_requests`` are already pending (``busy``); it runs on the network
        thread, so it must be cheap and must not raise.
        """
        self._requests[topic_suffix] = (handler, refusal)
        if self.connected.is_set():
            self._subscribe(self.client, self.topics.node(topic_suffix))

    def take_jobs(self, topic: str, delivered_on: str, handler: JobHandler,
                  receive_maximum: int, session_expiry: int) -> None:
        """Before ``start``: subscribe to the shared job queue ``topic`` (whose messages
        arrive on ``delivered_on``), with a persistent session kept ``session_expiry``
        seconds and at most ``receive_maximum`` unacknowledged jobs; ``handler`` gets each
        job on the network thread and must ``ack`` it once committed."""
        self._jobs = _JobQueue(topic, delivered_on, handler, receive_maximum, session_expiry)
        self.client.manual_ack_set(True)

    def ack(self, delivery: JobDelivery) -> bool:
        """Acknowledge a job (thread-safe); False when it was not sent: the connection has
        changed since the delivery (the broker re-sends the job) or the send failed."""
        if delivery.connection != self._connection or not self.connected.is_set():
            return False
        rc = self.client.ack(delivery.mid, delivery.qos)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            log.warning("MQTT: acknowledgement of job mid %d not sent: %s", delivery.mid,
                        mqtt.error_string(rc))
            return False
        return True

    def publish_now(self, topic: str, payload: str) -> None:
        """QoS 0, not through the outbox: answers that may be lost and must cost nothing
        when they come in floods (refused jobs). Skipped while disconnected."""
        if self.connected.is_set():
            self.client.publish(topic, payload, qos=0)

    def on_connection_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` (on paho's thread) when the broker connection is made or lost."""
        self._link_listeners.append(listener)

    def connection(self) -> MqttStatus:
        """The broker connection now: connected or not, failed attempts, last error, and
        what the broker refuses (subscriptions, messages)."""
        with self._link_lock:
            link = self._link
        return link.model_copy(update={
            "refused_subscriptions": sorted(self._refused_subscriptions),
            "refused_messages": len(self._retry)})

    def _tell_link_listeners(self) -> None:
        for listener in self._link_listeners:
            try:
                listener()
            except Exception:
                log.exception("MQTT: connection listener failed")

    def _link_changed(self, connected: bool, error: str | None) -> None:
        with self._link_lock:
            old = self._link
            if connected:
                self._link = MqttStatus(connected=True, since=_now())
            else:
                failed = error is not None
                self._link = MqttStatus(
                    connected=False, attempts=old.attempts + failed,
                    since=old.since if not old.connected else _now(),
                    error=error if failed else old.error)
        if old.connected != connected or not connected:
            self._tell_link_listeners()

    def _warn_while_down(self) -> None:
        """Publisher thread: the repeated WARNING while the broker cannot be reached."""
        link = self.connection()
        now = time.monotonic()
        if link.connected:
            self._down_warning_every = self.cfg.down_warning_seconds
            self._next_down_warning = 0.0
            return
        if link.attempts == 0 or now < self._next_down_warning:
            return
        down = (_now() - link.since).total_seconds() if link.since is not None else 0.0
        log.warning("MQTT: broker %s:%d unreachable for %.0f s (%d failed attempts, last: "
                    "%s); %d message(s) waiting in the outbox", self.cfg.host, self.cfg.port,
                    down, link.attempts, link.error, self.outbox.outbox_depth())
        self._next_down_warning = now + self._down_warning_every
        self._down_warning_every = min(self._down_warning_every * 2, MAX_DOWN_WARNING)

    # -- lifecycle ------------------------------------------------------------------------

    def _make_client(self) -> mqtt.Client:
        cfg = self.cfg
        client = broker_client(cfg, self.client_id)
        client.will_set(self.topics.node(AVAILABLE), "offline", qos=1, retain=True)
        client.reconnect_delay_set(min_delay=1, max_delay=cfg.reconnect_max_delay)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        return client

    def start(self) -> None:
        """Connect in the background (retrying with backoff) and start the publisher."""
        log.info("MQTT: connecting to %s:%d as %s (tls=%s, user=%s)", self.cfg.host,
                 self.cfg.port, self.client_id, self.cfg.tls.enabled, self.cfg.username or "-")
        session: dict[str, Any] = {}
        if self._jobs is not None:  # the broker keeps unacknowledged jobs while we are away
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self._jobs.session_expiry
            props.ReceiveMaximum = self._jobs.receive_maximum
            session = {"clean_start": False, "properties": props}
        try:
            self.client.connect_async(self.cfg.host, self.cfg.port,
                                      keepalive=self.cfg.keepalive, **session)
        except (OSError, ValueError) as exc:
            log.error("MQTT: cannot connect to %s:%d: %s: %s", self.cfg.host, self.cfg.port,
                      type(exc).__name__, exc)
            raise
        self.client.loop_start()
        self._publisher = threading.Thread(target=self._drain, name="mqtt-outbox", daemon=True)
        self._publisher.start()

    def stop(self, drain_seconds: float = 2.0) -> None:
        """Flush the outbox briefly, leave the job queue, publish ``offline``, disconnect.

        Leaving the job queue first means a box stopped on purpose is handed no new jobs
        while it is away (its session, with any job delivered but not yet acknowledged,
        is kept); only a box that vanished keeps a share until its session expires.
        """
        self.wait_drained(drain_seconds)
        self._stopping.set()
        self._wake.set()
        if self._publisher is not None:
            self._publisher.join(timeout=5)
        if self.connected.is_set():
            if self._jobs is not None:
                self.client.unsubscribe(self._jobs.topic)
            info = self.client.publish(self.topics.node(AVAILABLE), "offline", qos=1, retain=True)
            info.wait_for_publish(timeout=2)
        self.client.disconnect()
        self.client.loop_stop()
        self._command_worker.shutdown(wait=False, cancel_futures=True)
        self._request_worker.shutdown(wait=False, cancel_futures=True)

    @property
    def pending_requests(self) -> int:
        """Requests queued or running now."""
        return self._pending

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
                if not self._stopping.is_set():
                    self._warn_while_down()
                continue
            self._release_due_retries()
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
        refused = False
        while True:
            try:
                mid, reason = self._acks.get_nowait()
            except queue.Empty:
                break
            msg_id = self._inflight.pop(mid, None)
            if msg_id is None:
                continue  # status, available, replies: not outbox rows
            if reason is None:
                acked.append(msg_id)
                self._retry.pop(msg_id, None)
            else:
                delay = min(self._retry.get(msg_id, FIRST_RETRY_DELAY / 2) * 2,
                            self.cfg.publish_retry_max_delay)
                self._retry[msg_id] = delay
                self._retry_due[msg_id] = time.monotonic() + delay
                log.error("MQTT: broker refused %s (%s); re-sending in %.0f s",
                          msg_id, reason, delay)
                refused = True
        self.outbox.acknowledge(*acked)
        self._handed.difference_update(acked)
        if refused or (acked and self._retry):
            self._tell_link_listeners()

    def _release_due_retries(self) -> None:
        """Refused rows whose backoff has passed become publishable again (once each)."""
        now = time.monotonic()
        for msg_id in [m for m, due in self._retry_due.items() if due <= now]:
            del self._retry_due[msg_id]
            self._handed.discard(msg_id)

    # -- paho callbacks (network thread) ------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            log.error("MQTT: connection refused: %s", reason_code)
            self._link_changed(False, f"refused: {reason_code}")
            return
        log.info("MQTT: connected to %s:%d", self.cfg.host, self.cfg.port)
        # Subscribe before anything is published (here or, once ``connected`` is set, by
        # other threads): the broker handles one connection's packets in order, so once a
        # client sees ``online`` or a status the box is already listening for its commands.
        self._connection += 1
        self._subscribe(client, self.topics.commands)
        for suffix in self._requests:
            self._subscribe(client, self.topics.node(suffix))
        if self._jobs is not None:
            self._subscribe(client, self._jobs.topic)
        self.connected.set()
        self._link_changed(True, None)
        client.publish(self.topics.node(AVAILABLE), "online", qos=1, retain=True)
        client.publish(self.topics.node(STATUS), self._status(), qos=1, retain=True)
        self._wake.set()

    def _subscribe(self, client: mqtt.Client, topic: str) -> None:
        rc, mid = client.subscribe(topic, qos=1)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            log.error("MQTT: cannot subscribe to %s: %s", topic, mqtt.error_string(rc))
        elif mid is not None:
            self._subscriptions[mid] = topic

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside its ``except OSError`` block: the exception is current.
        exc = sys.exc_info()[1]
        why = f"{type(exc).__name__}: {exc}" if exc is not None else "unknown error"
        log.error("MQTT: cannot connect to %s:%d (tls=%s): %s; retrying with backoff",
                  self.cfg.host, self.cfg.port, self.cfg.tls.enabled, why)
        self._link_changed(False, why)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        topic = self._subscriptions.pop(mid, "?")
        failed = any(code.is_failure for code in reason_codes)
        for code in reason_codes:
            if code.is_failure:
                log.error("MQTT: broker refused the subscription to %s: %s", topic, code)
        if failed != (topic in self._refused_subscriptions):
            if failed:
                self._refused_subscriptions.add(topic)
            else:
                self._refused_subscriptions.discard(topic)
            self._tell_link_listeners()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        self.connected.clear()
        if not self._stopping.is_set():
            log.warning("MQTT: disconnected (%s); reconnecting with backoff", reason_code)
            self._link_changed(False, None)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        self._acks.put((mid, reason_code if reason_code.is_failure else None))
        self._wake.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        jobs = self._jobs
        if jobs is not None:
            if msg.topic == jobs.delivered_on and not msg.retain:
                self._take_job(jobs, msg)
                return
            if msg.qos > 0:  # manual acknowledgement is for jobs only
                client.ack(msg.mid, msg.qos)
            if msg.topic == jobs.delivered_on:
                log.warning("MQTT: ignoring a retained job on %s", msg.topic)
                return
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
            self._command_worker.submit(_guarded, command, bytes(msg.payload))
            return
        for suffix, (request, refusal) in self._requests.items():
            if msg.topic == self.topics.node(suffix):
                if msg.retain:
                    log.warning("MQTT: ignoring retained request on %s", msg.topic)
                    return
                code = self._admit(msg)
                if code is not None:
                    # QoS 0: paho keeps no copy awaiting a PUBACK, so a flood costs no memory;
                    # a lost refusal reads to the client like a timeout, the same advice.
                    self._reply(suffix, msg, _refusal(refusal, bytes(msg.payload), code),
                                qos=0)
                    return
                self._request_worker.submit(self._answer, suffix, request, msg)
                return

    def _take_job(self, jobs: _JobQueue, msg: mqtt.MQTTMessage) -> None:
        delivery = JobDelivery(bytes(msg.payload), msg.mid, msg.qos, bool(msg.dup),
                               self._connection)
        try:
            jobs.handler(delivery)
        except Exception:  # not committed: unacknowledged, the broker re-sends it
            log.exception("MQTT: job handler failed; the job stays with the broker")

    def _admit(self, msg: mqtt.MQTTMessage) -> Refusal | None:
        """Take a pending slot for ``msg``, or say why not (its client's rate, or busy)."""
        if self.cfg.client_rate > 0:
            client = getattr(getattr(msg, "properties", None), "ResponseTopic", None)
            if not self._rate.allow(client if isinstance(client, str) else MQTT311_CLIENTS):
                return "rate-limited"
        with self._pending_lock:
            if self._pending >= self.cfg.max_pending_requests:
                return "busy"
            self._pending += 1
        return None

    def _answer(self, suffix: str, handler: RequestHandler, msg: mqtt.MQTTMessage) -> None:
        """Run a request handler and publish its reply (see ``on_request`` for the topic)."""
        try:
            try:
                reply = handler(bytes(msg.payload))
            except Exception as exc:  # handlers should not raise; never lose the reply
                log.exception("MQTT: request handler for %s failed", suffix)
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            self._reply(suffix, msg, reply)
        finally:
            with self._pending_lock:
                self._pending -= 1

    def _reply(self, suffix: str, msg: mqtt.MQTTMessage, reply: dict[str, Any],
               qos: int = 1) -> None:
        """Publish ``reply`` on the request's response topic if it is safe, else the default."""
        props_in = getattr(msg, "properties", None)
        response_topic = getattr(props_in, "ResponseTopic", None)
        props = Properties(PacketTypes.PUBLISH)
        correlation = getattr(props_in, "CorrelationData", None)
        if correlation is not None:
            props.CorrelationData = correlation
        if response_topic is not None:
            problem = self.topics.response_topic_problem(
                response_topic, self.cfg.max_response_topic_length)
            if problem is not None:
                log.warning("MQTT: refusing response topic %r of a request on %s (%s); "
                            "replying on the default topic", response_topic[:120], suffix,
                            problem)
                response_topic = None
        if not response_topic:
            request_id = reply.get("request_id")
            response_topic = self.topics.response(
                suffix, request_id if isinstance(request_id, str) else None)
        info = self.client.publish(response_topic, json.dumps(reply), qos=qos, properties=props)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.warning("MQTT: reply to a request on %s not sent: %s", suffix,
                        mqtt.error_string(info.rc))


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _refusal(refusal: RefusalReply, payload: bytes, code: Refusal) -> dict[str, Any]:
    try:
        return refusal(payload, code)
    except Exception:  # the contract says it must not raise; fall back, never stall paho
        log.exception("MQTT: refusal reply builder failed")
        return refusal_reply(payload, code)


def _guarded(handler: CommandHandler, payload: bytes) -> None:
    try:
        handler(payload)
    except Exception:
        log.exception("MQTT: command handler failed")
