"""Journal + MQTT outbox benchmark: what crash-safe delivery costs on this box.

Measures, against a real mosquitto on 127.0.0.1 (started here on a free port):

* ``finish`` latency: one scene marked done + its result row in the outbox, one SQLite
  transaction with ``synchronous=FULL`` (the durable commit every scene pays);
* drain throughput: a backlog of N result-sized payloads (~1.5 kB) in the outbox when
  ``Comms`` connects, published at QoS 1 and deleted on PUBACK, until the outbox is empty;
* recovery: N more rows written while the broker is down; after it is back, the time
  until ``Comms`` has reconnected (backoff) and the time from there to an empty outbox.

    .venv/bin/python benchmarks/outbox.py [--messages 2000] [--out benchmarks/results/outbox.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from appliance.comms.message import Message
from appliance.comms.mqtt import Comms
from appliance.config import MQTTConfig
from appliance.ingest.journal import Journal

PAYLOAD = json.dumps({"pad": "x" * 1500})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(conf: Path) -> subprocess.Popen[bytes]:
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    port = int(conf.read_text().split()[1])
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("mosquitto did not start")


def fill(journal: Journal, n: int, tag: str) -> None:
    for i in range(n):
        journal.enqueue(Message(f"{tag}-{i}", f"bench/n/scene/{tag}{i}/result", PAYLOAD))


def drain(comms: Comms, journal: Journal, timeout: float = 600) -> float:
    """Seconds until the outbox is empty (the publisher wakes on acks; no help from here)."""
    t0 = time.perf_counter()
    while journal.outbox_depth() > 0:
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("outbox did not drain")
        time.sleep(0.01)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/outbox.json"))
    args = parser.parse_args()
    n = args.messages
    tmp = Path(tempfile.mkdtemp(prefix="outbox-bench-"))
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    "max_queued_messages 1000000\nmax_inflight_messages 0\n")
    journal = Journal(tmp / "journal.sqlite")
    results: dict[str, Any] = {"messages": n, "payload_bytes": len(PAYLOAD)}

    lat = []
    for i in range(200):
        journal.claim(f"s{i}", "a.tif", tmp / "a.tif")
        journal.start(f"s{i}")
        t0 = time.perf_counter()
        journal.finish(f"s{i}", Message(f"r{i}", "bench/x", PAYLOAD))
        lat.append(time.perf_counter() - t0)
    lat.sort()
    results["finish_ms"] = {"median": round(statistics.median(lat) * 1e3, 3),
                            "p95": round(lat[int(0.95 * len(lat))] * 1e3, 3)}
    journal.acknowledge(*(f"r{i}" for i in range(200)))

    broker = start_broker(conf)
    fill(journal, n, "a")  # a backlog, as after a restart: nothing is in flight yet
    comms = Comms(MQTTConfig(port=port, reconnect_max_delay=1), "n", journal, lambda: "{}")
    comms.start()
    while not comms.connected.is_set():
        time.sleep(0.01)
    seconds = drain(comms, journal)
    results["drain"] = {"seconds": round(seconds, 3), "msgs_per_s": round(n / seconds, 1)}

    broker.terminate()
    broker.wait()
    while comms.connected.is_set():
        time.sleep(0.01)
    fill(journal, n, "b")
    time.sleep(1.0)
    assert journal.outbox_depth() == n, "rows were deleted without a broker"
    broker = start_broker(conf)
    t0 = time.perf_counter()
    while not comms.connected.is_set():
        time.sleep(0.01)
    reconnect = time.perf_counter() - t0
    seconds = drain(comms, journal)
    results["after_outage"] = {"reconnect_seconds": round(reconnect, 3),
                               "drain_seconds": round(seconds, 3),
                               "msgs_per_s": round(n / seconds, 1),
                               "lost": journal.outbox_depth()}
    comms.stop()
    broker.terminate()
    broker.wait()
    journal.close()
    shutil.rmtree(tmp, ignore_errors=True)

    results["machine"] = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                          "load_avg_1m": round(os.getloadavg()[0], 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
