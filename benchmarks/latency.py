"""Drop-to-result latency: how long a scene waits beyond its own compute.

A real mosquitto (started here on a free port) and a real daemon (``python -m appliance
run``, the tests' ``DaemonProc``, with the small colour bundle the tests build and the
*default* ``input`` settings: ``settle_seconds`` 2, ``rescan_seconds`` 30). Small scenes
(64² GeoTIFFs, each with its own noise so each has its own scene id) are dropped one at a
time, each after the previous result arrived:

* ``renamed``: written as ``name.tif.part`` in the inbox, then renamed to ``name.tif`` (the
  documented way to drop; the clock starts at the rename), ``--gap`` seconds after the
  previous result, as scenes that arrive apart do;
* ``renamed_back_to_back``: the same, dropped the moment the previous result arrived. On
  Linux watchdog holds the events behind the daemon's own claim (a rename *out* of the
  inbox) for up to 0.5 s, in case a matching rename *into* a watched folder follows, so a
  drop within 0.5 s of the previous claim waits for the rest of that half second;
* ``in_place``: written straight to ``name.tif`` (the clock starts when the writer closed
  it), which still waits for the settle, for comparison.

drop → claim is when the file left the inbox (polled every millisecond here); drop →
result is when its ``scene/<id>/result`` arrived at a subscriber. "Beyond compute" is drop
→ result minus the scene's own ``timings.total`` (reading, inference, fusion, writing the
maps), i.e. the wait for the claim, the journal, the index and the MQTT round trip.

    .venv/bin/python benchmarks/latency.py [--scenes 50] [--in-place 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from benchmarks.outbox import free_port, start_broker
from tests.helpers.colour_bundle import build_colour_bundle
from tests.helpers.daemon import DaemonProc, P
from tests.helpers.mqtt_listener import Listener
from tests.helpers.scenes import quarters, write_scene

RESULTS = Path(__file__).parent / "results" / "latency.json"
SIZE = (64, 64)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(values: list[float]) -> dict[str, float]:
    return {"median_s": round(statistics.median(values), 4),
            "p95_s": round(percentile(values, 0.95), 4), "max_s": round(max(values), 4)}


def drop_one(daemon: DaemonProc, listener: Listener, scene: Path, how: str) -> dict[str, float]:
    """Drop ``scene`` (``renamed`` or ``in_place``), return its latencies in seconds."""
    data = scene.read_bytes()
    sid = hashlib.sha256(data).hexdigest()
    target = daemon.inbox / scene.name
    if how == "renamed":
        part = target.with_name(target.name + ".part")
        part.write_bytes(data)
        t0 = time.monotonic()
        part.rename(target)
    else:
        with target.open("wb") as fh:
            fh.write(data)
        t0 = time.monotonic()
    while target.exists():
        time.sleep(0.001)
    claimed = time.monotonic() - t0
    msg = listener.wait_for(lambda m: m.topic == f"{P}/scene/{sid}/result", timeout=120)[0]
    result = time.monotonic() - t0
    compute = float(json.loads(msg.payload)["timings"]["total"])
    return {"claim_s": claimed, "result_s": result, "compute_s": compute,
            "beyond_compute_s": result - compute}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=50, help="renamed drops")
    parser.add_argument("--in-place", type=int, default=5, help="in-place writes, to compare")
    parser.add_argument("--gap", type=float, default=1.0,
                        help="seconds between a result and the next spaced drop")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="latency-bench-"))
    port = free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    broker = start_broker(conf)
    daemon = DaemonProc(tmp / "node", build_colour_bundle(tmp / "bundle"), port,
                        input={"settle_seconds": 2.0, "rescan_seconds": 30.0})
    scenes = tmp / "scenes"
    scenes.mkdir()
    runs: dict[str, list[dict[str, float]]] = {"renamed": [], "renamed_back_to_back": [],
                                               "in_place": []}
    try:
        daemon.start()
        listener = Listener(port, f"{P}/scene/+/result")
        plan = (["renamed"] * args.scenes + ["renamed_back_to_back"] * args.scenes
                + ["in_place"] * args.in_place)
        for i, how in enumerate(plan):
            scene = write_scene(scenes / f"s{i:03d}.tif", size=SIZE, layout=quarters(*SIZE),
                                noise=4.0, seed=i)
            if how == "renamed":
                time.sleep(args.gap)
            runs[how].append(drop_one(daemon, listener, scene,
                                      "in_place" if how == "in_place" else "renamed"))
        daemon.terminate()
    finally:
        if daemon.proc is not None:
            daemon.kill()
        broker.terminate()
        broker.wait(timeout=10)
    out: dict[str, Any] = {
        "benchmark": "latency", "scene_size": list(SIZE),
        "settings": {"settle_seconds": 2.0, "rescan_seconds": 30.0}, "gap_s": args.gap,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_average": os.getloadavg()},
    }
    for how, rows in runs.items():
        if rows:
            out[how] = {"scenes": len(rows), **{
                key: summary([r[f"{key}_s"] for r in rows])
                for key in ("claim", "result", "compute", "beyond_compute")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
