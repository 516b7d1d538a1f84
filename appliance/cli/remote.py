"""Asking the running daemon over MQTT: send one ``cmd/<verb>`` and wait for its answer.

The daemon answers model commands on ``<p>/events/model``; the CLI subscribes there
before it sends, so the answer cannot slip past it.
"""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt

from appliance.comms.mqtt import broker_client
from appliance.comms.topics import MODEL_EVENTS, Topics
from appliance.config import Settings


def command_and_wait(settings: Settings, verb: str, payload: dict[str, Any],
                     answers: Callable[[dict[str, Any]], bool], timeout: float
                     ) -> dict[str, Any]:
    """Publish ``payload`` on ``<p>/cmd/<verb>``; the first model event ``answers`` accepts.

    ``TimeoutError`` when none comes within ``timeout`` s, ``OSError`` when the broker
    cannot be reached."""
    cfg = settings.mqtt
    topics = Topics(cfg.topic_prefix, settings.node_id)
    events: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
    subscribed: queue.SimpleQueue[bool] = queue.SimpleQueue()
    client = broker_client(cfg, f"terratile-cli-{uuid.uuid4().hex[:8]}")

    def on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            event = json.loads(msg.payload)
        except ValueError:
            return
        if isinstance(event, dict):
            events.put(event)

    client.on_message = on_message
    client.on_subscribe = lambda *_args: subscribed.put(True)
    client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive)
    client.loop_start()
    try:
        client.subscribe(topics.node(MODEL_EVENTS), qos=1)
        subscribed.get(timeout=10)
        client.publish(topics.command(verb), json.dumps(payload), qos=1
                       ).wait_for_publish(10)
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = events.get(timeout=left)
            except queue.Empty:
                break
            if answers(event):
                return event
        raise TimeoutError(f"no answer on {topics.node(MODEL_EVENTS)} within {timeout:.0f} s")
    finally:
        client.disconnect()
        client.loop_stop()
