"""One MQTT 5 connection of a fleet client: subscribe, publish, and read what arrives.

paho delivers on its network thread; this class hands each message to the caller through
a queue, so the fleet modules read messages in order, with their own deadlines, on the
caller's thread. ``sync`` is the barrier that makes reading retained state exact: the
broker handles one connection's packets in order, so a message the client publishes to
its own reply topic after subscribing comes back only after every retained message those
subscriptions delivered.
"""

from __future__ import annotations

import queue
import time
import uuid
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from appliance.comms.mqtt import broker_client
from appliance.comms.topics import FleetTopics
from appliance.config import MQTTConfig

CONNECT_TIMEOUT = 10.0


class LinkError(OSError):
    """The broker could not be reached, refused the client or one of its subscriptions."""


class FleetLink:
    """``with FleetLink(cfg) as link:`` a connected client with its own reply topic."""

    def __init__(self, cfg: MQTTConfig) -> None:
        self.cfg = cfg
        self.topics = FleetTopics(cfg.topic_prefix)
        self.client_id = f"terratile-fleet-{uuid.uuid4().hex[:12]}"
        self.reply_topic = self.topics.replies(self.client_id)
        self._messages: queue.SimpleQueue[mqtt.MQTTMessage] = queue.SimpleQueue()
        self._acks: queue.SimpleQueue[tuple[str, list[ReasonCode]]] = queue.SimpleQueue()
        self._client = broker_client(cfg, self.client_id)
        self._client.on_connect = self._on_connect
        self._client.on_message = lambda _c, _u, msg: self._messages.put(msg)
        self._client.on_subscribe = (
            lambda _c, _u, mid, codes, _p: self._acks.put((f"sub-{mid}", list(codes))))

    def __enter__(self) -> FleetLink:
        try:
            self._client.connect(self.cfg.host, self.cfg.port, keepalive=self.cfg.keepalive)
        except (OSError, ValueError) as exc:
            raise LinkError(f"cannot connect to the broker {self.cfg.host}:{self.cfg.port}: "
                            f"{type(exc).__name__}: {exc}") from exc
        self._client.loop_start()
        try:
            _, codes = self._acks.get(timeout=CONNECT_TIMEOUT)
        except queue.Empty as exc:
            self.__exit__(None, None, None)
            raise LinkError(f"no answer from the broker {self.cfg.host}:{self.cfg.port} "
                            f"within {CONNECT_TIMEOUT:.0f} s") from exc
        if any(code.is_failure for code in codes):
            self.__exit__(None, None, None)
            raise LinkError(f"the broker {self.cfg.host}:{self.cfg.port} refused the "
                            f"connection: {codes[0]}")
        self.subscribe(self.reply_topic)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self, _c: mqtt.Client, _u: Any, _flags: Any, reason_code: ReasonCode,
                    _props: Properties | None) -> None:
        self._acks.put(("connect", [reason_code]))

    def subscribe(self, *topics: str) -> None:
        """Subscribe to ``topics`` (QoS 1) and wait for the broker to grant every one."""
        rc, mid = self._client.subscribe([(t, 1) for t in topics])
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise LinkError(f"cannot subscribe to {', '.join(topics)}: {mqtt.error_string(rc)}")
        try:
            name, codes = self._acks.get(timeout=CONNECT_TIMEOUT)
        except queue.Empty as exc:
            raise LinkError(f"no SUBACK for {', '.join(topics)}") from exc
        refused = [t for t, code in zip(topics, codes, strict=False) if code.is_failure]
        if name != f"sub-{mid}" or refused:
            raise LinkError(f"the broker refused the subscription to {', '.join(refused)} "
                            "(an ACL?)")

    def publish(self, topic: str, payload: str, correlation: bytes | None = None) -> None:
        """QoS 1; with ``correlation`` as an MQTT 5 request answered on the reply topic."""
        props = None
        if correlation is not None:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = correlation
        info = self._client.publish(topic, payload, qos=1, properties=props)
        info.wait_for_publish(CONNECT_TIMEOUT)

    def sync(self) -> bytes:
        """Send a marker to the reply topic; ``is_sync(msg, marker)`` spots it coming back."""
        marker = f"sync-{uuid.uuid4().hex}".encode()
        self.publish(self.reply_topic, "", correlation=marker)
        return marker

    @staticmethod
    def is_sync(msg: mqtt.MQTTMessage, marker: bytes) -> bool:
        return correlation_of(msg) == marker and not msg.payload

    def receive(self, deadline: float) -> mqtt.MQTTMessage | None:
        """The next message, or None once ``deadline`` (``time.monotonic``) has passed."""
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        try:
            return self._messages.get(timeout=left)
        except queue.Empty:
            return None


def correlation_of(msg: mqtt.MQTTMessage) -> bytes | None:
    """The MQTT 5 correlation data of ``msg``, if any."""
    data = getattr(getattr(msg, "properties", None), "CorrelationData", None)
    return bytes(data) if data is not None else None
