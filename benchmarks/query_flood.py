"""Query flood benchmark: does a flood of retrieval queries delay commands or grow memory?

Against a real mosquitto on 127.0.0.1 (started here on a free port), a client floods
``<p>/retrieval/query`` at ``--rate`` queries/s for ``--seconds`` (QoS 0, MQTT 5 response
topic + correlation data carrying the send time) while it sends ``cmd/reload`` every
0.25 s. ``Comms`` answers with a stand-in handler that costs ``--query-ms`` per query
(roughly one faiss search plus the envelope), so the box can serve far fewer than it gets.

Recorded: replies answered and refused ``busy``, their latencies, each command's latency
(publish → handler running), and the process RSS (flood client and box in one process)
before and at its peak: the flood client runs in a child process, so that is the box's.

    .venv/bin/python benchmarks/query_flood.py [--rate 3000] [--seconds 5] \
        [--out benchmarks/results/query_flood.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.comms.mqtt import Comms
from appliance.config import MQTTConfig
from appliance.ingest.journal import Journal

NODE = "flood"
P = f"terratile/{NODE}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def flood(port: int, rate: int, seconds: float,
          out: multiprocessing.Queue[dict[str, Any]]) -> None:
    """The hostile client, in its own process so the box's RSS is the box's alone."""
    ok_lat: list[float] = []
    busy_lat: list[float] = []
    lock = threading.Lock()

    def on_reply(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        sent = struct.unpack("d", msg.properties.CorrelationData)[0]
        ms = (time.time() - sent) * 1000
        with lock:
            (busy_lat if b'"busy"' in msg.payload else ok_lat).append(ms)

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = on_reply
    sub.connect("127.0.0.1", port)
    sub.subscribe("bench/replies", qos=0)
    sub.loop_start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    time.sleep(0.5)
    sent = commands = 0
    t0 = time.monotonic()
    next_cmd = t0
    while (now := time.monotonic()) - t0 < seconds:
        due = int((now - t0) * rate)
        while sent < due:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = "bench/replies"
            props.CorrelationData = struct.pack("d", time.time())
            pub.publish(f"{P}/retrieval/query", '{"vector": [1, 0]}', qos=0, properties=props)
            sent += 1
        if now >= next_cmd:
            pub.publish(f"{P}/cmd/reload", struct.pack("d", time.time()), qos=1)
            commands += 1
            next_cmd += 0.25
        time.sleep(0.001)
    flood_s = time.monotonic() - t0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with lock:
            if len(ok_lat) + len(busy_lat) >= sent:
                break
        time.sleep(0.1)
    pub.loop_stop()
    sub.loop_stop()
    with lock:
        out.put({"ok": ok_lat, "busy": busy_lat, "sent": sent, "seconds": flood_s,
                 "commands_sent": commands})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--query-ms", type=float, default=2.0)
    ap.add_argument("--max-pending", type=int, default=MQTTConfig().max_pending_requests)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/query_flood.json"))
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="query-flood-"))
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 1000000\n")
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    broker = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)

    journal = Journal(tmp / "j.sqlite")
    command_sent: list[float] = []
    command_lat: list[float] = []

    def handler(payload: bytes) -> dict[str, Any]:
        time.sleep(args.query_ms / 1000)
        return {"request_id": None, "results": []}

    def reload(payload: bytes) -> None:
        sent = struct.unpack("d", payload)[0]
        command_lat.append((time.time() - sent) * 1000)

    cfg = MQTTConfig(port=port, topic_prefix="terratile", max_pending_requests=args.max_pending)
    comms = Comms(cfg, NODE, journal, lambda: "{}")
    comms.on_request("retrieval/query", handler)
    comms.on_command("reload", reload)
    comms.start()
    comms.connected.wait(10)

    rss_before = rss_mb()
    peak = [rss_before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.1)

    threading.Thread(target=sample, daemon=True).start()
    ctx = multiprocessing.get_context("fork")
    results: multiprocessing.Queue[dict[str, Any]] = ctx.Queue()
    client = ctx.Process(target=flood, args=(port, args.rate, args.seconds, results))
    client.start()
    stats = results.get(timeout=args.seconds + 60)
    client.join(10)
    deadline = time.monotonic() + 10
    while len(command_lat) < stats["commands_sent"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    ok_lat, busy_lat, sent, flood_s = (stats["ok"], stats["busy"], stats["sent"],
                                       stats["seconds"])
    command_sent = [0.0] * stats["commands_sent"]

    result = {
        "flood": {"rate_per_s": args.rate, "seconds": round(flood_s, 2), "sent": sent,
                  "query_cost_ms": args.query_ms, "max_pending_requests": args.max_pending},
        "replies": {"answered": len(ok_lat), "busy": len(busy_lat),
                    "lost": sent - len(ok_lat) - len(busy_lat)},
        "answered_latency_ms": {"median": pct(ok_lat, 0.5), "p95": pct(ok_lat, 0.95),
                                "max": pct(ok_lat, 1.0)},
        "busy_latency_ms": {"median": pct(busy_lat, 0.5), "p95": pct(busy_lat, 0.95)},
        "command_latency_ms": {"n": len(command_lat), "sent": len(command_sent),
                               "median": pct(command_lat, 0.5), "max": pct(command_lat, 1.0)},
        "rss_mb": {"before": round(rss_before, 1), "peak": round(peak[0], 1),
                   "growth": round(peak[0] - rss_before, 1)},
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
    }
    comms.stop()
    journal.close()
    broker.terminate()
    broker.wait(10)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
