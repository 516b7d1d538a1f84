"""The dashboard's API on a real daemon: token rules, rollback, live events, map, neighbours."""

from __future__ import annotations

import http.client
import io
import json
import time
from pathlib import Path

import pytest
from PIL import Image
from pydantic import ValidationError

from appliance.config import HTTPConfig
from tests.appliance.http.conftest import GATE, TOKEN, Box, start_box
from tests.conftest import Broker
from tests.helpers.scenes import quarters, write_scene


def drop_scene(box: Box, tmp_path: Path, name: str = "quarters.tif") -> dict:
    scene = write_scene(tmp_path / name, size=(128, 128), layout=quarters(128, 128))
    box.daemon.drop(scene)
    box.wait_done(1)
    return box.get("/api/scenes").json()[0]


def test_rollback_needs_the_token_and_switches_the_running_model(box: Box) -> None:
    assert box.get("/api/status").json()["status"]["model"]["version"] == 2
    assert box.request("POST", "/api/models/rollback").status == 401
    assert box.request("POST", "/api/models/rollback", token="wrong-token-0123456789").status == 401
    assert box.request("POST", "/api/models/rollback", cookie=TOKEN).status == 401  # header only
    reply = box.request("POST", "/api/models/rollback", token=TOKEN)
    assert reply.status == 200
    assert reply.json()["changed"] is True and reply.json()["model"]["version"] == 1
    models = box.get("/api/models").json()
    assert [(m["version"], m["active"]) for m in models["versions"]] == [(2, False), (1, True)]
    assert models["versions"][0]["gate"] == GATE and models["versions"][1]["gate"] is None
    assert box.get("/api/status").json()["status"]["model"]["version"] == 1
    again = box.request("POST", "/api/models/rollback", token=TOKEN).json()  # v1 has no parent
    assert again["done"] is True and again["changed"] is False
    assert b"rollback refused" in box.daemon.log.read_bytes()


def test_without_a_token_file_the_page_cannot_change_the_model(
        tmp_path: Path, colour_bundle: Path, broker: Broker) -> None:
    box = start_box(tmp_path / "box", colour_bundle, broker, two_versions=True, token=False)
    try:
        assert box.get("/api/models").json()["writes_enabled"] is False
        refused = box.request("POST", "/api/models/rollback", token=TOKEN)
        assert refused.status == 403 and "http.token_file" in refused.json()["error"]
        assert box.get("/api/status").json()["status"]["model"]["version"] == 2
    finally:
        box.daemon.terminate()


def test_beyond_loopback_every_read_but_the_probes_needs_the_token(
        tmp_path: Path, colour_bundle: Path, broker: Broker) -> None:
    box = start_box(tmp_path / "box", colour_bundle, broker, http={"host": "0.0.0.0"})
    try:
        for path in ("/", "/static/dashboard.js"):
            assert box.get(path).status == 200  # the page itself asks for the token
        for path in ("/api/status", "/api/scenes", "/api/models", "/metrics", "/api/events"):
            assert box.get(path).status == 401, path
        assert box.get("/api/status", token=TOKEN).status == 200
        assert box.request("GET", "/metrics", cookie=TOKEN).status == 200
        assert box.get("/healthz").status == 200 and box.get("/readyz").status == 200
    finally:
        box.daemon.terminate()


def test_config_refuses_an_open_port_without_a_token(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"http\.token_file"):
        HTTPConfig(host="0.0.0.0")
    assert HTTPConfig(host="127.0.0.1").token() is None
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ValueError, match="fewer than 16"):
        HTTPConfig(token_file=short).token()
    with pytest.raises(FileNotFoundError):
        HTTPConfig(token_file=tmp_path / "missing").token()


def read_events(response: http.client.HTTPResponse, until: float) -> dict:
    """The next ``status`` event of an open event stream."""
    data = None
    while time.monotonic() < until:
        line = response.readline().decode().rstrip("\n")
        if line.startswith("data: "):
            data = json.loads(line[6:])
        elif line == "" and data is not None:
            return data
    raise AssertionError("no status event in time")


def test_events_stream_pushes_each_status_change(box: Box, tmp_path: Path) -> None:
    host, port = box.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("GET", "/api/events")
    response = conn.getresponse()
    assert response.status == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    until = time.monotonic() + 90
    first = read_events(response, until)
    assert first["status"]["state"] == "ready" and first["status"]["counts"]["done"] == 0
    write_scene(tmp_path / "q.tif", size=(128, 128), layout=quarters(128, 128))
    box.daemon.drop(tmp_path / "q.tif")
    seen = [read_events(response, until)]
    while seen[-1]["status"]["counts"]["done"] < 1:
        seen.append(read_events(response, until))
    assert "processing" in {s["status"]["state"] for s in seen}
    conn.close()


def test_map_overlay_quicklook_neighbours_and_thumbnails(box: Box, tmp_path: Path) -> None:
    scene = drop_scene(box, tmp_path)
    sid = scene["scene_id"]
    w, s, e, n = scene["bounds_wgs84"]
    (south, west), (north, east) = box.get(f"/api/scenes/{sid}/overlay").json()["bounds"]
    cell = (n - s) / 8  # 8 x 8 cells
    assert abs(south - s) < cell and abs(north - n) < cell
    assert abs(west - w) < cell and abs(east - e) < cell
    overlay = Image.open(io.BytesIO(box.get(f"/api/scenes/{sid}/overlay.png").body))
    assert overlay.mode == "RGBA"
    colours = {c for _, c in overlay.getcolors(1 << 16) if c[3] == 255}
    assert len(colours) == 3  # urban, vegetation, water in their class colours
    quicklook = box.get(f"/api/scenes/{sid}/quicklook.png")
    assert quicklook.status == 200 and quicklook.body.startswith(b"\x89PNG")

    # the top-left quarter is urban: its nearest cells are urban cells of the same scene
    lon, lat = w + (e - w) * 0.2, n - (n - s) * 0.2
    reply = box.get(f"/api/scenes/{sid}/neighbours?lon={lon}&lat={lat}&k=4").json()
    assert "error" not in reply, reply
    hits = reply["results"]
    assert len(hits) == 4 and {h["class"] for h in hits} == {"urban"}
    window = ",".join(str(v) for v in hits[0]["window"])
    thumb = box.get(f"/api/scenes/{sid}/thumbnail.png?window={window}")
    assert thumb.status == 200
    picture = Image.open(io.BytesIO(thumb.body)).convert("RGB")
    assert picture.size == (96, 96)

    assert box.get(f"/api/scenes/{sid}/neighbours?lon=x&lat=1").status == 400
    assert box.get(f"/api/scenes/{sid}/neighbours?lon=1&lat=1&k=1000").status == 400
    assert box.get(f"/api/scenes/{sid}/thumbnail.png?window=1,2").status == 400
    assert box.get(f"/api/scenes/{sid}/thumbnail.png?window=0,0,9000,16").status == 400
    whole = box.get(f"/api/scenes/{sid}/thumbnail.png?window=0,0,128,128")  # read decimated
    assert Image.open(io.BytesIO(whole.body)).size == (96, 96)
    outside = box.get(f"/api/scenes/{sid}/thumbnail.png?window=4000,4000,16,16")
    assert outside.status == 404 and "outside" in outside.json()["error"]
    assert box.get(f"/api/scenes/{'0' * 64}/overlay").status == 404
    assert box.get(f"/api/scenes/{'0' * 64}/thumbnail.png?window=0,0,16,16").status == 404
    far = box.get(f"/api/scenes/{sid}/neighbours?lon=0&lat=0").json()
    assert far["error"]["code"] == "no-cell"
