"""The fleet's work queue: what a job costs beside an inbox file, how jobs spread, what a
remote scene fetches, and what a broker carries at fleet scale.

Real parts throughout: mosquitto (persistence on, started here on a free port), daemons
(``python -m appliance run``, the tests' ``DaemonProc`` with the small colour bundle),
nginx serving COGs with byte ranges (the tests' ``RangeServer``; its access log counts
the bytes), jobs submitted by the fleet CLI's engine (``submit_jobs``).

* ``overhead``: one node; the same scenes (512² COGs) one at a time, first dropped into
  the inbox (``.part`` then rename; ``input.settle_seconds`` 0.2 as in the tests), then as
  jobs by URL. Per scene: submit → result at a subscriber, minus the scene's own
  ``timings.total``, i.e. what the path adds (claim or job commit, HEAD, journal, MQTT);
* ``spread``: three nodes, ``--jobs`` 256² jobs submitted at once: jobs per node, wall time;
* ``remote_read``: one larger COG (``--big`` px a side, 512-px tiles, deflate) by URL: bytes
  nginx sent for it against its size, requests, and each byte range fetched how often;
* ``memory``: the node's peak RSS (VmHWM) after that scene by URL, and a fresh node's after
  the same scene dropped into its inbox;
* ``probe``: in this process, the bytes ``process_scene`` fetches for the same COG (under
  two names, so GDAL's cache of the first read does not serve the second) with and
  without the sharpness probe (16 windows read before the main pass, for routing and
  adaptation: the daemons above run with adaptation on, so with the probe);
* ``broker``: mosquitto's QoS 1 rate on this box for job-sized messages through a shared
  subscription (the base of the capacity estimate in docs/benchmarks.md).

    .venv/bin/python benchmarks/fleet.py [--scenes 10] [--jobs 30] [--big 2048] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from appliance.config import MQTTConfig, Settings
from appliance.contract.bundle import load_bundle
from appliance.contract.payloads import JOB_SCHEMA, SceneJob, SceneResult
from appliance.fleet.link import FleetLink
from appliance.fleet.submit import SceneRequest, submit_jobs
from appliance.model.runtime import ModelRuntime, ProviderPlan
from appliance.scene.pipeline import process_scene
from appliance.scene.source import RemoteAccess, SceneSource
from benchmarks.outbox import free_port, start_broker
from tests.helpers.colour_bundle import build_colour_bundle
from tests.helpers.daemon import DaemonProc
from tests.helpers.mqtt_listener import Listener
from tests.helpers.range_server import RangeServer, write_cog
from tests.helpers.scenes import quarters, write_scene

RESULTS = Path(__file__).parent / "results" / "fleet.json"
FLEET = {"enabled": True, "schemes": ["http"], "http_timeout": 10, "max_inflight": 2}
# Every phase has nodes of its own; a node that was stopped leaves the group at once.


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": round(statistics.median(ordered), 4), "min": round(ordered[0], 4),
            "max": round(ordered[-1], 4)}


def peak_rss_mb(node: DaemonProc) -> float:
    assert node.proc is not None
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmHWM")


def wait_online(port: int, node: str) -> None:
    """Until ``node`` publishes ``online``: it has subscribed to the job queue by then."""
    seen = Listener(port, f"terratile/{node}/available")
    seen.wait_for(lambda m: m.payload == b"online", timeout=60)
    seen.close()


def result_of(listener: Listener, done: int) -> SceneResult:
    got = listener.wait_for(lambda m: m.topic.endswith("/result"), done + 1, timeout=300)
    return SceneResult.model_validate_json(got[done].payload)


def job(url: str, job_id: str) -> str:
    return SceneJob(schema_=JOB_SCHEMA, job_id=job_id, scene=url,
                    reply_to="bench/jobs").to_json()


def overhead(tmp: Path, bundle: Path, port: int, server: RangeServer, www: Path,
             scenes: int) -> dict[str, Any]:
    node = DaemonProc(tmp / "overhead", bundle, port, node_id="edge-o", fleet=FLEET)
    node.start()
    wait_online(port, node.node_id)
    listener = Listener(port, "terratile/edge-o/scene/+/result")
    publisher = Listener(port, "bench/none")
    rows: dict[str, list[dict[str, float]]] = {"inbox": [], "broker": []}
    try:
        for path in ("inbox", "broker"):
            for i in range(scenes):
                name = f"o{i:02d}.tif"
                t0 = time.perf_counter()
                if path == "inbox":
                    node.drop(www / name)
                else:
                    publisher.publish("terratile/jobs", job(server.url(name), f"o-{i}"))
                result = result_of(listener, len(rows["inbox"]) + len(rows["broker"]))
                took = time.perf_counter() - t0
                compute = result.timings["total"]
                rows[path].append({"result_s": took, "compute_s": compute,
                                   "beyond_compute_s": took - compute})
        node.terminate()
    finally:
        if node.proc is not None:
            node.kill()
        listener.close()
        publisher.close()
    out: dict[str, Any] = {path: {k: summary([r[f"{k}_s"] for r in rs])
                                  for k in ("result", "compute", "beyond_compute")}
                           for path, rs in rows.items()}
    out["broker_beyond_compute_minus_inbox_s"] = round(
        out["broker"]["beyond_compute"]["median"] - out["inbox"]["beyond_compute"]["median"], 4)
    out["scenes_per_path"] = scenes
    return out


def spread(tmp: Path, bundle: Path, port: int, server: RangeServer, jobs: int
           ) -> dict[str, Any]:
    nodes = [DaemonProc(tmp / f"spread-{n}", bundle, port, node_id=f"edge-{n}", fleet=FLEET)
             for n in "abc"]
    try:
        for node in nodes:
            node.start()
        with FleetLink(MQTTConfig(port=port)) as link:
            report = submit_jobs(link, [SceneRequest(server.url(f"s{i:02d}.tif"))
                                        for i in range(jobs)], lease=120, timeout=600)
        for node in nodes:
            node.terminate()
    finally:
        for node in nodes:
            if node.proc is not None:
                node.kill()
    per_node = Counter(j.node for j in report.jobs if j.state == "done")
    return {"jobs": jobs, "done": report.count("done"), "per_node": dict(sorted(per_node.items())),
            "resubmitted": sum(j.submissions - 1 for j in report.jobs),
            "wall_s": round(report.seconds, 2),
            "jobs_per_s": round(report.count("done") / report.seconds, 2)}


def remote_read(tmp: Path, bundle: Path, port: int, server: RangeServer, www: Path
                ) -> dict[str, Any]:
    """The big COG by URL on a fresh node, then dropped into another fresh node's inbox."""
    out: dict[str, Any] = {}
    for path in ("broker", "inbox"):
        node = DaemonProc(tmp / f"big-{path}", bundle, port, node_id=f"edge-{path}",
                          fleet=FLEET if path == "broker" else {"enabled": False})
        node.start()
        wait_online(port, node.node_id)
        listener = Listener(port, f"terratile/edge-{path}/scene/+/result")
        before = peak_rss_mb(node)
        try:
            if path == "broker":
                listener.publish("terratile/jobs", job(server.url("big.tif"), f"big-{path}"))
            else:
                node.drop(www / "big.tif")
            result = result_of(listener, 0)
            out[f"{path}_peak_rss_mb"] = peak_rss_mb(node)
            out[f"{path}_rss_at_ready_mb"] = before
            out[f"{path}_compute_s"] = result.timings["total"]
            node.terminate()
        finally:
            if node.proc is not None:
                node.kill()
            listener.close()
    hits = [h for h in server.hits() if h.path == "/big.tif"]
    size = (www / "big.tif").stat().st_size
    fetched = sum(h.body_bytes for h in hits)
    ranges: Counter[str] = Counter(h.range for h in hits if h.method == "GET")
    out.update({"cog_bytes": size, "fetched_bytes": fetched,
                "fetched_over_size": round(fetched / size, 4),
                "requests": len(hits), "gets": sum(ranges.values()),
                "heads": sum(1 for h in hits if h.method == "HEAD"),
                "whole_file_gets": sum(1 for h in hits if h.method == "GET" and h.status == 200),
                "range_fetched_more_than_once": sum(1 for n in ranges.values() if n > 1)})
    return out


def probe_bytes(tmp: Path, bundle: Path, server: RangeServer, www: Path) -> dict[str, Any]:
    """Bytes fetched for the big COG by ``process_scene`` itself, with and without the probe."""
    runtime = ModelRuntime(load_bundle(bundle), ProviderPlan(providers=("cpu",)))
    settings = Settings.model_validate({"model": {"providers": ["cpu"]},
                                        "tiling": {"scales": [16, 32], "batch_size": 64}})
    size = (www / "big.tif").stat().st_size
    out: dict[str, Any] = {}
    for probe in (False, True):
        name = f"big-probe-{probe}.tif".lower()
        shutil.copyfile(www / "big.tif", www / name)
        process_scene(SceneSource("http", server.url(name), RemoteAccess()), "ab" * 32,
                      tmp / f"probe-{probe}", runtime, settings, probe_sharpness=probe)
        time.sleep(0.5)  # nginx writes a request's line when it ends
        hits = [h for h in server.hits() if h.path == f"/{name}"]
        out["with_probe" if probe else "without_probe"] = {
            "fetched_over_size": round(sum(h.body_bytes for h in hits) / size, 4),
            "gets": sum(1 for h in hits if h.method == "GET")}
    return out


def broker_rate(port: int, messages: int, payload: str) -> dict[str, Any]:
    """QoS 1 job-sized messages from one publisher through a shared subscription."""
    got = threading.Event()
    count = [0]

    def on_message(_c: mqtt.Client, _u: Any, _m: mqtt.MQTTMessage) -> None:
        count[0] += 1
        if count[0] == messages:
            got.set()

    sub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.subscribe("$share/bench/bench/jobs", qos=1)
    sub.loop_start()
    time.sleep(0.5)
    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.max_inflight_messages_set(100)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    t0 = time.perf_counter()
    infos = [pub.publish("bench/jobs", payload, qos=1) for _ in range(messages)]
    for info in infos:
        info.wait_for_publish(30)
    got.wait(60)
    took = time.perf_counter() - t0
    pub.loop_stop()
    sub.loop_stop()
    return {"messages": messages, "received": count[0], "payload_bytes": len(payload),
            "seconds": round(took, 3), "messages_per_s": round(count[0] / took)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=10, help="scenes per path (overhead)")
    parser.add_argument("--jobs", type=int, default=30, help="jobs over three nodes (spread)")
    parser.add_argument("--big", type=int, default=2048, help="side of the big COG, px")
    parser.add_argument("--broker-messages", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    load_before = os.getloadavg()
    port = free_port()
    conf = tmp / "mosquitto.conf"
    (tmp / "db").mkdir()
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                    f"persistence_location {tmp}/db/\nmax_queued_messages 100000\n")
    broker = start_broker(conf)
    bundle = build_colour_bundle(tmp / "bundle")
    www, plain = tmp / "www", tmp / "plain"
    www.mkdir()
    plain.mkdir()
    for i in range(args.scenes):
        write_cog(write_scene(plain / f"o{i:02d}.tif", size=(512, 512), noise=4.0, seed=i,
                              layout=quarters(512, 512)), www / f"o{i:02d}.tif")
    for i in range(args.jobs):
        write_cog(write_scene(plain / f"s{i:02d}.tif", noise=4.0, seed=1000 + i),
                  www / f"s{i:02d}.tif")
    big = (args.big, args.big)
    write_cog(write_scene(plain / "big.tif", size=big, noise=6.0, seed=7,
                          layout=quarters(*big)), www / "big.tif", blocksize=512)
    out: dict[str, Any] = {"benchmark": "fleet", "mosquitto_persistence": True}
    try:
        with RangeServer(www, tmp / "nginx") as server:
            out["overhead"] = overhead(tmp, bundle, port, server, www, args.scenes)
            out["spread"] = spread(tmp, bundle, port, server, args.jobs)
            out["remote_read"] = remote_read(tmp, bundle, port, server, www)
            out["probe"] = probe_bytes(tmp, bundle, server, www)
        out["broker"] = broker_rate(port, args.broker_messages,
                                    job("http://data.example.org/s2/T32TQM_20260101.tif",
                                        "0123456789ab-17"))
    finally:
        broker.terminate()
        broker.wait(timeout=10)
    out["machine"] = {"cpu": platform.processor() or platform.machine(),
                      "cores": os.cpu_count(), "load_average_before": load_before,
                      "load_average_after": os.getloadavg()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
