"""The daemon end to end, as a real subprocess: real mosquitto, real GeoTIFFs, real ONNX.

The daemon runs as ``python -m appliance run`` so SIGKILL is a real crash. Scenes are
small (128² px, scales 16/32) except where a scene must still be running when it is
killed; then the test polls the journal until the scene is ``processing`` and kills.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import rasterio

from appliance.contract.payloads import SceneResult, result_msg_id
from tests.conftest import Broker
from tests.helpers.daemon import NODE, DaemonProc, P
from tests.helpers.mqtt_listener import Listener, Received
from tests.helpers.paths import REPO
from tests.helpers.scenes import quarters, write_scene


@pytest.fixture()
def daemon(tmp_path: Path, colour_bundle: Path, broker: Broker) -> Iterator[DaemonProc]:
    d = DaemonProc(tmp_path / "box", colour_bundle, broker.port)
    yield d
    if d.proc is not None:
        d.kill()


def results(m: Received) -> bool:
    return m.topic.startswith(f"{P}/scene/") and m.topic.endswith("/result")


def failures(m: Received) -> bool:
    return m.topic.startswith(f"{P}/scene/") and m.topic.endswith("/failed")


def scene_id_of(path: Path) -> str:
    from appliance.contract.bundle import sha256_file
    return sha256_file(path)


def test_dropped_scene_yields_result_with_outputs(daemon: DaemonProc, broker: Broker,
                                                  tmp_path: Path) -> None:
    listener = Listener(broker.port, f"{P}/#")
    scene = write_scene(tmp_path / "halves.tif", size=(128, 128))
    daemon.start()
    daemon.drop(scene)
    msg = listener.wait_for(results)[0]
    result = SceneResult.model_validate_json(msg.payload)
    sid = scene_id_of(scene)
    assert msg.topic == f"{P}/scene/{sid}/result" and msg.qos == 1
    assert result.scene_id == sid and result.source == "halves.tif"
    assert result.msg_id == result_msg_id(sid) and result.node_id == NODE
    assert (result.model.name, result.model.version) == ("colour-test", 1)
    assert result.classes["urban"].fraction == pytest.approx(0.5, abs=0.05)
    assert result.classes["vegetation"].fraction == pytest.approx(0.5, abs=0.05)
    assert result.classes["urban"].area_ha > 0 and result.mean_confidence > 0.5
    assert result.tiles > 0 and result.timings["total"] > 0
    assert result.drift is not None and result.drift.drifting is False
    with rasterio.open(scene) as src, rasterio.open(result.outputs["landuse"]) as out:
        assert out.crs == src.crs and out.bounds == pytest.approx(src.bounds)
        assert tuple(result.bounds) == pytest.approx(tuple(src.bounds))
    for path in result.outputs.values():
        assert Path(path).is_file() and Path(path).parent.name == sid
    # The input moves on just after the result is committed (and maybe published).
    daemon.wait(lambda: (daemon.root / "processed" / "halves.tif").is_file(), "input moved")
    assert not any(daemon.inbox.iterdir())
    def last_status() -> dict[str, object]:
        statuses = [m for m in list(listener.messages) if m.topic == f"{P}/status"]
        return json.loads(statuses[-1].payload) if statuses else {}

    daemon.wait(lambda: last_status().get("state") == "ready", "ready after the scene")
    assert last_status()["model"] == {"name": "colour-test", "version": 1, "domain": None}
    late = Listener(broker.port, f"{P}/status")  # joins later: gets the retained status
    retained = late.wait_for(lambda m: m.topic == f"{P}/status")[0]
    assert retained.retain and json.loads(retained.payload)["state"] == "ready"
    late.close()
    assert listener.wait_for(lambda m: m.topic == f"{P}/stats")
    assert daemon.terminate() == 0
    listener.close()
    after = Listener(broker.port, f"{P}/available")
    assert after.wait_for(lambda m: m.topic == f"{P}/available")[0].text() == "offline"
    after.close()


def test_bad_files_fail_cleanly_and_the_next_scene_works(daemon: DaemonProc, broker: Broker,
                                                         tmp_path: Path) -> None:
    listener = Listener(broker.port, f"{P}/#")
    good = write_scene(tmp_path / "good.tif", size=(128, 128))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "zero.tif").write_bytes(b"")
    (bad / "corrupt.tif").write_bytes(b"II*\x00" + os.urandom(4000))
    (bad / "truncated.tif").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    (bad / "notes.txt").write_text("not a raster at all\n")
    daemon.start()
    half = daemon.inbox / "half.tif.part"
    half.write_bytes(good.read_bytes()[:1000])  # a writer still busy: must be left alone
    for f in sorted(bad.iterdir()):
        daemon.drop(f)
    failed = listener.wait_for(failures, count=4)
    by_source = {json.loads(m.payload)["source"]: json.loads(m.payload) for m in failed}
    assert set(by_source) == {"zero.tif", "corrupt.tif", "truncated.tif", "notes.txt"}
    for name, payload in by_source.items():
        assert payload["schema"] == "terratile.scene-failed/1"
        moved = Path(payload["moved_to"])
        assert moved.is_file() and moved.parent == daemon.root / "failed" / payload["reason"]
        assert moved.name == name and payload["message"]
        sidecar = json.loads(moved.with_name(moved.name + ".json").read_text())
        assert sidecar["reason"] == payload["reason"] and sidecar["source"] == name
    assert {p["reason"] for p in by_source.values()} <= {"unreadable", "empty"}
    daemon.drop(good)
    ok = listener.wait_for(results)[0]
    assert json.loads(ok.payload)["source"] == "good.tif"
    assert half.exists() and half.read_bytes() == good.read_bytes()[:1000]
    listener.close()


def persistent_broker(tmp_path: Path) -> Broker:
    """A broker that keeps sessions and queued QoS 1 messages across a restart."""
    b = Broker(tmp_path)
    store = tmp_path / "mosquitto-db"
    store.mkdir()
    b.conf.write_text(b.conf.read_text().replace(
        "persistence false", f"persistence true\npersistence_location {store}/\n"
        + ("user root\n" if os.geteuid() == 0 else "")))
    return b


def test_broker_outage_and_daemon_kill_lose_no_result(tmp_path: Path,
                                                      colour_bundle: Path) -> None:
    """Results produced while the broker is down wait in the outbox, across a SIGKILL."""
    broker = persistent_broker(tmp_path)
    broker.start()
    listener = Listener(broker.port, f"{P}/scene/#", client_id="t-persist", session_expiry=600)
    d = DaemonProc(tmp_path / "box", colour_bundle, broker.port)
    try:
        d.start()
        broker.stop()
        scenes = [write_scene(tmp_path / f"s{i}.tif", size=(128, 128), noise=3.0, seed=i)
                  for i in range(3)]
        for s in scenes:
            d.drop(s)
        d.wait(lambda: sum(st == "done" for st, _ in d.scenes().values()) == 3, "3 done")
        waiting = [t for t in d.outbox_topics() if t.endswith("/result")]
        assert len(waiting) == 3  # nothing acknowledged: the broker is down
        outputs = {scene_id_of(s): (d.root / "results" / scene_id_of(s) / "landuse.tif")
                   .stat().st_mtime_ns for s in scenes}
        d.kill()  # the results exist only in the journal's outbox now
        broker.start()
        d.start()
        got = listener.wait_for(results, count=3, timeout=60)
        ids = {json.loads(m.payload)["scene_id"]: json.loads(m.payload)["msg_id"] for m in got}
        assert ids == {sid: result_msg_id(sid) for sid in outputs}
        d.wait(lambda: d.outbox_topics() == [], "outbox drained")
        assert all(attempts == 1 for _, attempts in d.scenes().values())  # not recomputed
        for sid, mtime in outputs.items():
            assert (d.root / "results" / sid / "landuse.tif").stat().st_mtime_ns == mtime
        time.sleep(1.0)
        assert len(listener.matching(results)) == 3
    finally:
        if d.proc is not None:
            d.kill()
        listener.close()
        broker.stop()


def big_scene(tmp_path: Path) -> Path:
    """A scene that takes a second or more, so it can be killed while 'processing'."""
    return write_scene(tmp_path / "big.tif", size=(1536, 1536), layout=quarters(1536, 1536))


def kill_mid_scene(d: DaemonProc, scene: Path) -> str:
    sid = scene_id_of(scene)
    d.drop(scene)
    d.wait(lambda: d.scenes().get(sid, ("", 0))[0] == "processing", "scene processing")
    d.kill()
    assert d.scenes()[sid] == ("processing", 1)
    return sid


def test_sigkill_mid_scene_then_restart_publishes_once(daemon: DaemonProc, broker: Broker,
                                                       tmp_path: Path) -> None:
    listener = Listener(broker.port, f"{P}/#")
    scene = big_scene(tmp_path)
    daemon.start()
    sid = kill_mid_scene(daemon, scene)
    listener.wait_for(lambda m: m.topic == f"{P}/available" and m.text() == "offline")
    late = Listener(broker.port, f"{P}/available")  # the LWT is retained for newcomers
    lwt = late.wait_for(lambda m: m.topic == f"{P}/available")[0]
    assert lwt.retain and lwt.text() == "offline"
    late.close()
    daemon.start()
    got = listener.wait_for(results)
    assert json.loads(got[0].payload)["msg_id"] == result_msg_id(sid)
    assert daemon.scenes()[sid] == ("done", 2)
    daemon.wait(lambda: not any(p for p in (daemon.root / "work").rglob("*") if p.is_file()),
                "work/ emptied")
    # The same bytes dropped again under another name: recognised, not recomputed; the
    # stored result is re-announced under the same msg_id.
    landuse = daemon.root / "results" / sid / "landuse.tif"
    mtime = landuse.stat().st_mtime_ns
    daemon.drop(scene, name="again.tif")
    again = listener.wait_for(results, count=2)
    assert {json.loads(m.payload)["msg_id"] for m in again} == {result_msg_id(sid)}
    assert daemon.scenes()[sid] == ("done", 2) and landuse.stat().st_mtime_ns == mtime
    daemon.wait(lambda: (daemon.root / "processed" / "again.tif").exists(), "dup disposed")
    time.sleep(0.5)
    assert len(listener.matching(results)) == 2
    listener.close()


def test_scene_that_keeps_crashing_is_failed_as_crash_loop(tmp_path: Path, broker: Broker,
                                                           colour_bundle: Path) -> None:
    d = DaemonProc(tmp_path / "box", colour_bundle, broker.port, input={"max_attempts": 1})
    listener = Listener(broker.port, f"{P}/#")
    scene = big_scene(tmp_path)
    try:
        d.start()
        sid = kill_mid_scene(d, scene)
        d.start()
        failed = json.loads(listener.wait_for(failures)[0].payload)
        assert failed["scene_id"] == sid and failed["reason"] == "crash-loop"
        assert Path(failed["moved_to"]) == d.root / "failed" / "crash-loop" / "big.tif"
        assert Path(failed["moved_to"]).is_file()
        assert d.scenes()[sid] == ("failed", 1)
        ok = write_scene(tmp_path / "ok.tif", size=(128, 128))
        d.drop(ok)
        assert json.loads(listener.wait_for(results)[0].payload)["source"] == "ok.tif"
    finally:
        if d.proc is not None:
            d.kill()
        listener.close()


@pytest.mark.slow
def test_real_torch_exported_bundle_end_to_end(tmp_path: Path, broker: Broker) -> None:
    """The workstation's real export path (torch → ONNX → sealed bundle) runs in the daemon."""
    pytest.importorskip("torch", reason="needs the [export] extra to build the bundle")
    from tests.helpers.torch_bundle import build_tiny_bundle

    bundle = build_tiny_bundle(tmp_path / "torch")
    d = DaemonProc(tmp_path / "box", bundle, broker.port)
    listener = Listener(broker.port, f"{P}/#")
    scene = write_scene(tmp_path / "quarters.tif", size=(128, 128),
                        layout=quarters(128, 128))
    try:
        d.start()
        d.drop(scene)
        result = SceneResult.model_validate_json(listener.wait_for(results)[0].payload)
        assert (result.model.name, result.model.version) == ("tiny-torch", 1)
        assert set(result.classes) == {"urban", "vegetation", "water"}
        assert sum(c.fraction for c in result.classes.values()) == pytest.approx(1.0, abs=1e-3)
        assert 0 < result.mean_confidence <= 1 and result.tiles == 2 * 8 * 8
        with rasterio.open(result.outputs["landuse"]) as out, rasterio.open(scene) as src:
            assert out.crs == src.crs and out.bounds == pytest.approx(src.bounds)
        assert d.terminate() == 0
    finally:
        if d.proc is not None:
            d.kill()
        listener.close()


def test_commands_retained_ignored_live_reload_runs(tmp_path: Path, broker: Broker,
                                                    colour_bundle: Path) -> None:
    from appliance.model.store import ModelStore
    from tests.helpers.colour_bundle import build_colour_bundle

    d = DaemonProc(tmp_path / "box", colour_bundle, broker.port)
    store = ModelStore(d.root / "state" / "models")
    store.install(colour_bundle)
    store.install(build_colour_bundle(tmp_path / "v2", version=2))  # active: v2
    listener = Listener(broker.port, f"{P}/#")
    listener.publish(f"{P}/cmd/rollback", "{}", retain=True)  # stale: must not fire on start
    try:
        d.start()
        d.wait(lambda: b"ignoring retained command" in d.log.read_bytes(), "retained ignored")

        def status_version(m: Received) -> bool:
            return m.topic == f"{P}/status" and json.loads(m.payload)["model"]["version"] == 2
        listener.wait_for(status_version)
        store.activate(1)  # e.g. `terratile models activate 1`, then tell the daemon
        listener.publish(f"{P}/cmd/reload", "{}")
        event = json.loads(listener.wait_for(lambda m: m.topic == f"{P}/events/model")[0]
                           .payload)
        assert event["action"] == "reload" and event["model"]["version"] == 1
        assert event["previous"]["version"] == 2
        assert not any(json.loads(m.payload)["action"] == "rollback"
                       for m in listener.matching(lambda m: m.topic == f"{P}/events/model"))
    finally:
        if d.proc is not None:
            d.kill()
        listener.close()


def test_scene_kinds_uint8_uint16_nodata_geographic(tmp_path: Path, broker: Broker,
                                                    colour_bundle: Path) -> None:
    """One daemon, band selection from config (scenes are stored B,G,R[,NIR]); inputs deleted."""
    d = DaemonProc(tmp_path / "box", colour_bundle, broker.port,
                   input={"bands": [3, 2, 1], "keep_processed": False})
    listener = Listener(broker.port, f"{P}/scene/#")
    bgr = (2, 1, 0)
    scenes = {
        "u8.tif": write_scene(tmp_path / "u8.tif", size=(128, 128), band_order=bgr),
        "u16.tif": write_scene(tmp_path / "u16.tif", size=(128, 128), bands=4,
                               dtype="uint16", band_order=bgr, gain=40.0, offset=100.0),
        "border.tif": write_scene(tmp_path / "border.tif", size=(160, 160), band_order=bgr,
                                  nodata=0, border=16),
        "wgs84.tif": write_scene(tmp_path / "wgs84.tif", size=(128, 128), band_order=bgr,
                                 crs="EPSG:4326"),
    }
    try:
        d.start()
        for s in scenes.values():
            d.drop(s)
        got = listener.wait_for(results, count=len(scenes))
        by_name = {r.source: r for r in (SceneResult.model_validate_json(m.payload)
                                         for m in got)}
        assert set(by_name) == set(scenes)
        for name, result in by_name.items():
            assert result.classes["urban"].fraction == pytest.approx(0.5, abs=0.1), name
            assert result.classes["vegetation"].fraction == pytest.approx(0.5, abs=0.1), name
            with rasterio.open(scenes[name]) as src, \
                    rasterio.open(result.outputs["landuse"]) as out:
                assert out.crs == src.crs, name
                assert out.bounds == pytest.approx(src.bounds), name
        d.wait(lambda: not any(p.is_file() for p in (d.root / "work").rglob("*")), "inputs gone")
        assert not (d.root / "processed").exists()  # keep_processed: false deletes inputs
        assert by_name["wgs84.tif"].crs == "EPSG:4326"
        assert by_name["wgs84.tif"].bounds_wgs84 == pytest.approx(by_name["wgs84.tif"].bounds)
    finally:
        if d.proc is not None:
            d.kill()
        listener.close()


def test_sd_notify_ready_watchdog_stopping(daemon: DaemonProc, tmp_path: Path) -> None:
    """Under a (simulated) systemd: READY after reconciliation, watchdog pings, STOPPING."""
    import socket

    sock_path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(sock_path))
        server.settimeout(30)
        daemon.start(NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="1000000")
        seen: list[str] = []
        while not any(m.startswith("READY=1") for m in seen):
            seen.append(server.recv(4096).decode())
        ready = next(m for m in seen if m.startswith("READY=1"))
        assert "STATUS=ready; model colour-test v1" in ready
        assert any("reconciling" in m for m in seen[: seen.index(ready)])
        pings = 0
        while pings < 3:  # the main loop pings every half interval while idle
            pings += server.recv(4096) == b"WATCHDOG=1"
        assert daemon.terminate() == 0
        rest = []
        server.settimeout(1)
        with contextlib.suppress(TimeoutError):
            while True:
                rest.append(server.recv(4096).decode())
        assert any(m.startswith("STOPPING=1") for m in rest)


def test_sigterm_mid_scene_interrupts_it_and_the_restart_finishes_it(
        daemon: DaemonProc, broker: Broker, tmp_path: Path) -> None:
    """Finding 13: a stop does not wait for a large scene; the scene is kept in work/, its
    attempt is not counted, and the next start processes it."""
    listener = Listener(broker.port, f"{P}/scene/#")
    scene = write_scene(tmp_path / "huge.tif", size=(4096, 4096), layout=quarters(4096, 4096))
    sid = scene_id_of(scene)
    daemon.start()
    daemon.drop(scene)
    daemon.wait(lambda: daemon.scenes().get(sid, ("", 0))[0] == "processing", "processing")
    t0 = time.monotonic()
    assert daemon.terminate() == 0
    assert time.monotonic() - t0 < 10
    assert daemon.scenes()[sid] == ("claimed", 0)
    assert [p.name for p in (daemon.root / "work").glob("*/*")] == ["huge.tif"]
    daemon.start()
    assert json.loads(listener.wait_for(results, timeout=120)[0].payload)["scene_id"] == sid
    assert daemon.scenes()[sid] == ("done", 1)
    listener.close()


def test_hostile_files_and_a_damaged_journal(daemon: DaemonProc, broker: Broker,
                                            tmp_path: Path) -> None:
    """Issue 16: a Latin-1 name, a symlink to /proc/self/pagemap and a FIFO are handled
    without a restart; the state is not world-readable; a damaged journal exits 78."""
    import subprocess
    import sys

    listener = Listener(broker.port, f"{P}/#")
    good = write_scene(tmp_path / "good.tif", size=(128, 128))
    daemon.start()
    latin = os.fsdecode(b"caf\xe9.tif")
    daemon.drop(good, latin)
    (daemon.inbox / "pagemap.tif").symlink_to("/proc/self/pagemap")
    os.mkfifo(daemon.inbox / "pipe.tif")
    failed = {json.loads(m.payload)["source"]: json.loads(m.payload)
              for m in listener.wait_for(failures, count=2)}
    assert {f["reason"] for f in failed.values()} == {"not-a-file"}
    assert set(failed) == {"pagemap.tif", "pipe.tif"}
    ok = json.loads(listener.wait_for(results)[0].payload)
    assert ok["source"] == "caf\\xe9.tif"
    daemon.wait(lambda: (daemon.root / "processed" / latin).exists(), "original name kept")
    journal = daemon.root / "state" / "journal.sqlite"
    assert journal.stat().st_mode & 0o007 == 0  # umask 0027
    assert daemon.terminate() == 0
    listener.close()
    data = journal.read_bytes()
    journal.write_bytes(b"\x00" * 100 + data[100:])
    proc = subprocess.run([sys.executable, "-m", "appliance", "run", "--config",
                           str(daemon.config)], capture_output=True, timeout=60,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 78
    assert b"journal" in proc.stdout + proc.stderr and journal.exists()
