"""Query flood benchmark: does a flood of retrieval queries delay commands, starve other
clients or grow memory?

Against a real mosquitto on 127.0.0.1 (started here on a free port), a client floods
``<p>/retrieval/query`` at ``--rate`` queries/s for ``--seconds`` (QoS 0, MQTT 5 response
topic + correlation data carrying the send time) while it sends ``cmd/reload`` every
0.25 s, and a second, calm client sends one query every 0.25 s on its own response topic.
``Comms`` answers with a stand-in handler that costs ``--query-ms`` per query (roughly one
faiss search plus the envelope), so the box can serve far fewer than it gets.

The same flood runs twice in one process: without the per-client rate limit
(``mqtt.client_rate: 0``) and with the default limit. Recorded for each: replies answered,
refused ``busy`` and refused ``rate-limited``, their latencies, the calm client's
latency, each command's latency (publish → handler running), and the box's RSS before and
at its peak (the clients run in a child process).

    .venv/bin/python benchmarks/query_flood.py [--rate 3000] [--seconds 5] \
        [--out benchmarks/results/query_flood.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from appliance.comms.mqtt import Comms
from appliance.config import MQTTConfig
from appliance.ingest.journal import Journal
from benchmarks.outbox import free_port, start_broker

NODE = "flood"
P = f"terratile/{NODE}"


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
    """The hostile client and a calm one, in their own process so the box's RSS is the
    box's alone."""
    lat: dict[str, list[float]] = {"ok": [], "busy": [], "rate-limited": [], "calm": [],
                                   "calm-refused": []}
    lock = threading.Lock()

    def on_reply(client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        sent = struct.unpack("d", msg.properties.CorrelationData)[0]
        ms = (time.time() - sent) * 1000
        if msg.topic == "bench/calm":
            kind = "calm-refused" if b'"error"' in msg.payload else "calm"
        elif b'"rate-limited"' in msg.payload:
            kind = "rate-limited"
        else:
            kind = "busy" if b'"busy"' in msg.payload else "ok"
        with lock:
            lat[kind].append(ms)

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = on_reply
    sub.connect("127.0.0.1", port)
    sub.subscribe("bench/#", qos=0)
    sub.loop_start()
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    time.sleep(0.5)

    def query(reply_to: str) -> None:
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = reply_to
        props.CorrelationData = struct.pack("d", time.time())
        pub.publish(f"{P}/retrieval/query", '{"vector": [1, 0]}', qos=0, properties=props)

    sent = ticks = 0
    t0 = time.monotonic()
    next_tick = t0
    while (now := time.monotonic()) - t0 < seconds:
        due = int((now - t0) * rate)
        while sent < due:
            query("bench/replies")
            sent += 1
        if now >= next_tick:  # an operator's command and a calm client's query
            pub.publish(f"{P}/cmd/reload", struct.pack("d", time.time()), qos=1)
            query("bench/calm")
            ticks += 1
            next_tick += 0.25
        time.sleep(0.001)
    flood_s = time.monotonic() - t0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with lock:
            if sum(len(v) for v in lat.values()) >= sent + ticks:
                break
        time.sleep(0.1)
    pub.loop_stop()
    sub.loop_stop()
    with lock:
        out.put({"lat": lat, "sent": sent, "seconds": flood_s, "ticks": ticks})


def latency(values: list[float]) -> dict[str, float | int | None]:
    return {"n": len(values), "median": pct(values, 0.5), "p95": pct(values, 0.95),
            "max": pct(values, 1.0)}


def start_mosquitto(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 1000000\n")
    return start_broker(conf), port


def scenario(args: argparse.Namespace, client_rate: float) -> dict[str, Any]:
    """One flood against a fresh broker and box with ``mqtt.client_rate = client_rate``."""
    tmp = Path(tempfile.mkdtemp(prefix="query-flood-"))
    broker, port = start_mosquitto(tmp)
    journal = Journal(tmp / "j.sqlite")
    command_lat: list[float] = []

    def handler(payload: bytes) -> dict[str, Any]:
        time.sleep(args.query_ms / 1000)
        return {"request_id": None, "results": []}

    def reload(payload: bytes) -> None:
        command_lat.append((time.time() - struct.unpack("d", payload)[0]) * 1000)

    cfg = MQTTConfig(port=port, topic_prefix="terratile", max_pending_requests=args.max_pending,
                     client_rate=client_rate)
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
    while len(command_lat) < stats["ticks"] and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    lat, sent = stats["lat"], stats["sent"]
    flooded = len(lat["ok"]) + len(lat["busy"]) + len(lat["rate-limited"])
    result = {
        "mqtt": {"client_rate": client_rate, "client_burst": cfg.client_burst,
                 "max_pending_requests": args.max_pending},
        "flood": {"rate_per_s": args.rate, "seconds": round(stats["seconds"], 2),
                  "sent": sent, "query_cost_ms": args.query_ms},
        "replies": {"answered": len(lat["ok"]), "busy": len(lat["busy"]),
                    "rate_limited": len(lat["rate-limited"]), "lost": sent - flooded},
        "answered_latency_ms": latency(lat["ok"]),
        "refused_latency_ms": latency(lat["busy"] + lat["rate-limited"]),
        "calm_client": {"sent": stats["ticks"], "answered": len(lat["calm"]),
                        "refused": len(lat["calm-refused"]),
                        "latency_ms": latency(lat["calm"] + lat["calm-refused"])},
        "command_latency_ms": {**latency(command_lat), "sent": stats["ticks"]},
        "rss_mb": {"before": round(rss_before, 1), "peak": round(peak[0], 1),
                   "growth": round(peak[0] - rss_before, 1)},
    }
    comms.stop()
    journal.close()
    broker.terminate()
    broker.wait(10)
    return result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=int, default=3000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--query-ms", type=float, default=2.0)
    ap.add_argument("--max-pending", type=int, default=MQTTConfig().max_pending_requests)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/query_flood.json"))
    args = ap.parse_args()
    without = scenario(args, client_rate=0.0)
    with_limit = scenario(args, client_rate=MQTTConfig().client_rate)
    calm = [r["calm_client"]["latency_ms"]["median"] for r in (without, with_limit)]
    result = {
        "without_client_limit": without,
        "with_client_limit": with_limit,
        "calm_client_median_ratio": (round(calm[1] / calm[0], 3)
                                     if calm[0] and calm[1] is not None else None),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_1m": round(os.getloadavg()[0], 2)},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
