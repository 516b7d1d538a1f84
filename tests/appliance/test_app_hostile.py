"""Hostile input and broken state against the real daemon (issue 16): a real subprocess, a
real mosquitto, real files, a real small filesystem and a canary HTTP server on 127.0.0.1
that records any request the box makes (there must be none).

Each test reproduces one or more findings end to end; the unit tests beside each part
(raster opening, lifecycle, comms, retrieval) cover the cases one by one.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.conftest import Broker
from tests.helpers.colour_bundle import EMBED_DIM
from tests.helpers.daemon import DaemonProc, P
from tests.helpers.hostile import Canary, fill, tmpfs, vrt_xml, wms_xml, write_sparse
from tests.helpers.mqtt_listener import Listener, Received, topic_is
from tests.helpers.paths import REPO
from tests.helpers.scenes import quarters, write_scene

VECTOR = [1.0] * EMBED_DIM


@pytest.fixture()
def box(tmp_path: Path) -> Path:
    return tmp_path / "box"


def results(m: Received) -> bool:
    return m.topic.startswith(f"{P}/scene/") and m.topic.endswith("/result")


def failures(m: Received) -> bool:
    return m.topic.startswith(f"{P}/scene/") and m.topic.endswith("/failed")


def by_source(messages: list[Received]) -> dict[str, dict]:
    return {json.loads(m.payload)["source"]: json.loads(m.payload) for m in messages}


def ask(listener: Listener, request: dict, response_topic: str,
        retain: bool = False) -> None:
    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = response_topic
    listener.publish(f"{P}/retrieval/query", json.dumps(request), retain=retain,
                     properties=props)


def online(m: Received) -> bool:
    return m.topic == f"{P}/available" and m.payload == b"online" and not m.retain


def error_code(m: Received) -> str | None:
    return json.loads(m.payload).get("error", {}).get("code")


def nan_left_half(path: Path) -> Path:
    """A float64 scene, no nodata tag, whose left (urban) half is NaN; the right half is
    vegetation above water."""
    write_scene(path, dtype="float64", size=(128, 128), layout=quarters(128, 128))
    with rasterio.open(path, "r+") as dst:
        assert dst.nodata is None
        data = dst.read()
        data[:, :, :64] = np.nan
        dst.write(data)
    return path


def test_hostile_files_are_refused_with_their_reason_and_send_no_request(
        box: Path, tmp_path: Path, colour_bundle: Path, broker: Broker) -> None:
    """Findings 2, 4, 11 and 14: network VRT and WMS XML, a sparse GeoTIFF of enormous
    declared size, NaN without a nodata tag, a newline in a file name."""
    daemon = DaemonProc(box, colour_bundle, broker.port)
    listener = Listener(broker.port, f"{P}/#")
    with Canary() as canary:
        (tmp_path / "net.tif").write_text(vrt_xml([f"/vsicurl/{canary.url}/x.tif"] * 3))
        (tmp_path / "wms.tif").write_text(wms_xml(canary.url))
        write_sparse(tmp_path / "huge.tif", 200_000)
        nan_left_half(tmp_path / "nan.tif")
        good = write_scene(tmp_path / "good.tif", size=(128, 128))
        daemon.start()
        try:
            for name in ("net.tif", "wms.tif", "huge.tif", "nan.tif"):
                daemon.drop(tmp_path / name)
            daemon.drop(good, "forged\nERROR something bad.tif")
            failed = by_source(listener.wait_for(failures, count=3, timeout=120))
            done = by_source(listener.wait_for(results, count=2, timeout=120))
            assert daemon.proc is not None and daemon.proc.poll() is None
        finally:
            daemon.terminate()
            listener.close()
        assert canary.requests == []
    assert {k: v["reason"] for k, v in failed.items()} == {
        "net.tif": "format", "wms.tif": "format", "huge.tif": "too-large"}
    assert "200000x200000" in failed["huge.tif"]["message"]
    nan = done["nan.tif"]["classes"]
    assert nan["urban"]["fraction"] == 0.0
    assert nan["vegetation"]["fraction"] == pytest.approx(0.5, abs=0.05)
    assert nan["water"]["fraction"] == pytest.approx(0.5, abs=0.05)
    assert set(done) == {"nan.tif", "forged\nERROR something bad.tif"}
    lines = daemon.log.read_text(errors="replace").splitlines()
    assert not any(line.startswith("ERROR something bad") for line in lines)


def test_hostile_queries_are_refused_and_cannot_steer_the_box(
        box: Path, tmp_path: Path, colour_bundle: Path, broker: Broker) -> None:
    """Findings 2, 4, 6 and 14 over MQTT: query images that reference the network or
    declare an enormous size, a path outside allowed_dirs, NUL in a path, a response
    topic aimed at the box's own command topic, a retained query across a restart."""
    allowed = tmp_path / "q"
    allowed.mkdir()
    daemon = DaemonProc(box, colour_bundle, broker.port,
                        retrieval={"allowed_dirs": [str(allowed)]})
    listener = Listener(broker.port, f"{P}/#", "replies/#")
    with Canary() as canary:
        (allowed / "net.tif").write_text(vrt_xml([f"/vsicurl/{canary.url}/x.tif"] * 3))
        write_sparse(allowed / "huge.tif", 200_000)
        daemon.start()
        try:
            listener.wait_for(online)  # the box listens once it says it is online
            asked = {"net": {"image": str(allowed / "net.tif")},
                     "huge": {"image": str(allowed / "huge.tif")},
                     "outside": {"image": "/etc/passwd"},
                     "nul": {"image": str(allowed) + "/a\u0000.png"}}
            for name, request in asked.items():
                ask(listener, {"request_id": name, **request}, f"replies/{name}")
            codes = {name: error_code(listener.wait_for(topic_is(f"replies/{name}"))[0])
                     for name in asked}
            assert codes == {"net": "format", "huge": "too-large",
                             "outside": "forbidden-path",
                             "nul": "bad-request"}

            ask(listener, {"request_id": "steer", "vector": VECTOR}, f"{P}/cmd/adapt")
            default = listener.wait_for(topic_is(f"{P}/retrieval/response/steer"))[0]
            assert json.loads(default.payload)["request_id"] == "steer"

            # A retained query is answered once, live (delivered to a live subscriber it is
            # an ordinary message), and never again when the box restarts.
            ask(listener, {"request_id": "old", "vector": VECTOR}, "replies/old",
                retain=True)
            listener.wait_for(topic_is("replies/old"))
            assert daemon.terminate() == 0
            daemon.start()
            listener.wait_for(online, count=2)
            daemon.wait(lambda: b"ignoring retained request" in daemon.log.read_bytes(),
                        "retained query ignored")
            listener.publish(f"{P}/cmd/reload", "{}")  # a live command still runs ...
            daemon.wait(lambda: b"reload: model v1 already runs" in daemon.log.read_bytes(),
                        "reload after restart")
        finally:
            listener.publish(f"{P}/retrieval/query", "", retain=True)  # clear it
            if daemon.proc is not None:
                daemon.terminate()
            listener.close()
        assert canary.requests == []
    # ... but the forged topic got nothing and started nothing; the retained query got
    # no second answer after the restart.
    assert listener.matching(topic_is(f"{P}/cmd/adapt")) == []
    log = daemon.log.read_text(errors="replace")
    assert "refusing response topic" in log and "MQTT: command adapt" not in log
    assert len(listener.matching(topic_is("replies/old"))) == 1


def test_one_flooding_client_is_rate_limited_while_another_is_answered(
        box: Path, colour_bundle: Path, broker: Broker) -> None:
    """Finding 7: a flood from one client is refused beyond its rate (bounded, answered
    at once), while a second client's query and an operator's command still run."""
    daemon = DaemonProc(box, colour_bundle, broker.port,
                        mqtt={"client_rate": 1.0, "client_burst": 10})
    listener = Listener(broker.port, "replies/#", f"{P}/available")
    daemon.start()
    try:
        listener.wait_for(online)
        flood = 2000
        for i in range(flood):
            ask(listener, {"request_id": f"f{i}", "vector": VECTOR}, "replies/flood")
        ask(listener, {"request_id": "calm", "vector": VECTOR}, "replies/calm")
        listener.publish(f"{P}/cmd/reload", "{}")
        calm = listener.wait_for(topic_is("replies/calm"), timeout=60)[0]
        assert json.loads(calm.payload)["request_id"] == "calm"
        assert error_code(calm) != "rate-limited"
        replies = listener.wait_for(topic_is("replies/flood"), count=flood, timeout=120)
        codes = [error_code(m) for m in replies]
        assert codes.count("rate-limited") >= flood - 10 - 200  # ≤ 200 s of refill at 1/s
        daemon.wait(lambda: b"reload: model v1 already runs" in daemon.log.read_bytes(),
                    "reload during the flood")
    finally:
        daemon.terminate()
        listener.close()


def test_a_full_results_disk_fails_the_scene_and_the_box_goes_on(
        box: Path, tmp_path: Path, colour_bundle: Path, broker: Broker) -> None:
    """Finding 3: with ~4 KB free on the results disk (and the free-space floor off, so
    GDAL itself meets ENOSPC) the scene fails ``disk-full``; nothing crashes; once space
    is back the next scene is done."""
    with tmpfs(tmp_path / "results", "1m") as disk:
        if disk is None:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        daemon = DaemonProc(box, colour_bundle, broker.port,
                            paths={"results": str(disk), "min_free_mb": 0})
        listener = Listener(broker.port, f"{P}/#")
        daemon.start()
        try:
            filler = fill(disk)
            daemon.drop(write_scene(tmp_path / "a.tif", size=(128, 128)))
            failed = by_source(listener.wait_for(failures, timeout=120))
            assert failed["a.tif"]["reason"] == "disk-full"
            assert daemon.proc is not None and daemon.proc.poll() is None
            filler.unlink()
            daemon.drop(write_scene(tmp_path / "b.tif", size=(128, 128), noise=2.0, seed=1))
            done = by_source(listener.wait_for(results, timeout=120))
            assert set(done) == {"b.tif"}
            assert (box / "failed" / "disk-full" / "a.tif").exists()
        finally:
            daemon.terminate()
            listener.close()


def test_damaged_state_at_start(box: Path, tmp_path: Path, colour_bundle: Path,
                                broker: Broker) -> None:
    """Finding 9: a damaged retrieval index (a cache) is moved aside and the box starts;
    4 KB scribbled in the middle of the journal is a clear exit 78, never a READY box
    that fails every scene."""
    daemon = DaemonProc(box, colour_bundle, broker.port)
    listener = Listener(broker.port, f"{P}/#")
    state = box / "state"
    try:
        daemon.start()
        for i in range(3):
            daemon.drop(write_scene(tmp_path / f"s{i}.tif", size=(128, 128), noise=2.0, seed=i))
        listener.wait_for(results, count=3, timeout=120)
        assert daemon.terminate() == 0
        index = next(p for p in state.rglob("*.sqlite") if p.name != "journal.sqlite")
        index.write_bytes(b"\xff" * 512 + index.read_bytes()[512:])
        daemon.start()
        daemon.drop(write_scene(tmp_path / "after.tif", size=(128, 128), noise=2.0, seed=9))
        assert "after.tif" in by_source(listener.wait_for(results, count=4, timeout=120))
        assert daemon.terminate() == 0
    finally:
        if daemon.proc is not None:
            daemon.kill()
        listener.close()
    assert any(".corrupt-" in p.name for p in state.rglob("*"))
    assert b"is damaged" in daemon.log.read_bytes()

    journal = state / "journal.sqlite"
    with sqlite3.connect(journal) as con:
        pages = con.execute("PRAGMA page_count").fetchone()[0]
        size = con.execute("PRAGMA page_size").fetchone()[0]
    assert pages >= 3
    data = bytearray(journal.read_bytes())
    middle = (pages // 2) * size
    data[middle:middle + 4096] = os.urandom(4096)
    journal.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "appliance", "run", "--config",
                           str(daemon.config)], capture_output=True, timeout=60, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 78, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert b"journal" in proc.stdout + proc.stderr
