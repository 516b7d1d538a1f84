"""A real MQTT 5 subscriber for tests: collects messages, waits for the ones a test needs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int
    properties: Any

    def text(self) -> str:
        return self.payload.decode()


class Listener:
    """Subscribes to ``topics`` on 127.0.0.1:``port`` and records every message."""

    def __init__(self, port: int, *topics: str, client_id: str = "",
                 session_expiry: int = 0) -> None:
        """``session_expiry`` > 0 keeps the session (and queued messages) while away."""
        self.messages: list[Received] = []
        self._cond = threading.Condition()
        self._subscribed = threading.Event()
        self.topics = topics
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        props = None
        if session_expiry:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry
        self.client.connect("127.0.0.1", port, clean_start=not session_expiry,
                            properties=props)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("test listener could not subscribe")

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe([(t, 1) for t in self.topics])

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain),
                                          msg.qos, getattr(msg, "properties", None)))
            self._cond.notify_all()

    def matching(self, pred: Callable[[Received], bool]) -> list[Received]:
        with self._cond:
            return [m for m in self.messages if pred(m)]

    def wait_for(self, pred: Callable[[Received], bool], count: int = 1,
                 timeout: float = 30.0) -> list[Received]:
        """The first ``count`` messages satisfying ``pred``; TimeoutError with what arrived."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self.messages if pred(m)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [(m.topic, m.payload[:80]) for m in self.messages]
                    raise TimeoutError(f"wanted {count} message(s), got {len(found)}; "
                                       f"all messages: {seen}")
                self._cond.wait(left)

    def publish(self, topic: str, payload: str, retain: bool = False,
                properties: Properties | None = None) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain,
                            properties=properties).wait_for_publish(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def topic_is(topic: str) -> Callable[[Received], bool]:
    return lambda m: m.topic == topic


def topic_endswith(suffix: str) -> Callable[[Received], bool]:
    return lambda m: m.topic.endswith(suffix)
