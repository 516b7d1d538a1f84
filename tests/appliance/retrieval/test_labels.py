"""Label sets in the retrieval index (multi-label bundles): stored per row, filtered all-of
through the index, the CLI and MQTT (real SQLite, faiss, mosquitto), and the migration of
an entry log written before the column existed."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from appliance.cli.main import app
from appliance.comms.mqtt import Comms
from appliance.config import InputConfig, MQTTConfig, RetrievalConfig
from appliance.ingest.journal import Journal
from appliance.retrieval.entry_log import Entry, EntryLog, Filters
from appliance.retrieval.index import TileIndex
from appliance.retrieval.query import RequestError, parse_request
from appliance.retrieval.service import RetrievalService
from tests.conftest import Broker
from tests.helpers.colour_bundle import PURE, build_colour_bundle
from tests.helpers.mqtt_listener import Listener
from tests.helpers.outcomes import CLASSES, DIM, outcome, unit

THRESHOLDS = {"urban": 0.5, "vegetation": 0.5, "water": 0.5}


def multi_label_outcome(scene_id: str, seed: int) -> Any:
    """12 cells; cell i holds urban if i is even, vegetation if i % 3 == 0, water if i % 4 == 0."""
    base = outcome(scene_id, seed)
    i = np.arange(12)
    probs = np.stack([i % 2 == 0, i % 3 == 0, i % 4 == 0], axis=1).astype(np.float32) * 0.8 + 0.1
    return replace(base, cells=replace(base.cells, probs=probs), label_thresholds=THRESHOLDS)


def expected(i: int) -> tuple[str, ...]:
    return tuple(n for n, on in zip(CLASSES, (i % 2 == 0, i % 3 == 0, i % 4 == 0),
                                    strict=True) if on)


@pytest.fixture()
def index(tmp_path: Path) -> TileIndex:
    idx = TileIndex(tmp_path / "state", RetrievalConfig(), DIM)
    idx.add_scene(multi_label_outcome("m1", seed=1), CLASSES)
    return idx


def test_rows_carry_their_label_set_and_filter_all_of(index: TileIndex) -> None:
    out = multi_label_outcome("m1", seed=1)
    hits = index.search(out.cells.embeddings[6], 12)
    assert len(hits) == 12
    by_window = {h.entry.window: h for h in hits}
    for i, window in enumerate(out.cells.windows):
        assert by_window[tuple(int(v) for v in window)].entry.labels == expected(i)
    assert hits[0].as_dict()["labels"] == ["urban", "vegetation"]  # cell 6
    both = index.search(out.cells.embeddings[6], 12,
                        Filters(labels=frozenset({"urban", "vegetation"})))
    assert {h.entry.window[0] // 16 + 4 * (h.entry.window[1] // 16) for h in both} == {0, 6}
    assert all({"urban", "vegetation"} <= set(h.entry.labels or ()) for h in both)
    all_three = index.search(out.cells.embeddings[0], 12,
                             Filters(labels=frozenset(CLASSES)))
    assert [h.entry.window for h in all_three] == [(0, 0, 16, 16)]  # only cell 0
    # a label that is a substring of another row's text matches nothing by accident
    assert index.search(out.cells.embeddings[0], 12, Filters(labels=frozenset({"urb"}))) == []


def test_single_label_scenes_have_no_label_set(tmp_path: Path) -> None:
    idx = TileIndex(tmp_path, RetrievalConfig(), DIM)
    idx.add_scene(outcome("s1", seed=1), CLASSES)
    query = unit(np.random.default_rng(0), 1)[0]
    hits = idx.search(query, 5)
    assert len(hits) == 5 and all(h.entry.labels is None for h in hits)
    assert idx.search(query, 5, Filters(labels=frozenset({"urban"}))) == []


def test_old_entry_log_gains_the_labels_column(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite"
    db = sqlite3.connect(path)  # the layout written before label sets existed
    db.executescript("""
        CREATE TABLE entries (id INTEGER PRIMARY KEY AUTOINCREMENT, scene_id TEXT NOT NULL,
            source TEXT NOT NULL, col INTEGER, row INTEGER, width INTEGER, height INTEGER,
            crs TEXT, minx REAL, miny REAL, maxx REAL, maxy REAL, lon_min REAL, lat_min REAL,
            lon_max REAL, lat_max REAL, class TEXT, confidence REAL, label TEXT,
            ts REAL NOT NULL, vector BLOB NOT NULL);
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('dim', '8');
    """)
    db.execute("INSERT INTO entries (scene_id, source, class, ts, vector) VALUES (?,?,?,?,?)",
               ("old", "old.tif", "urban", 1.0, np.ones(DIM, np.float32).tobytes()))
    db.commit()
    db.close()
    log = EntryLog(path, DIM)
    (old_id,) = log.ids()
    assert log.entries([int(old_id)])[int(old_id)][0].labels is None  # kept, no label set
    log.replace(["new"], [Entry("new", "new.tif", labels=("urban", "water"))],
                np.ones((1, DIM), np.float32), ts=2.0)
    assert len(log.ids(Filters(labels=frozenset({"water"})))) == 1
    assert len(log.ids()) == 2
    log.close()
    EntryLog(path, DIM).close()  # opening a migrated log again changes nothing


def test_label_filter_requests_are_validated() -> None:
    q = parse_request({"vector": [1.0] * DIM, "filters": {"labels": ["cars", "water"]}}, 50)
    assert q.filters.labels == frozenset({"cars", "water"})
    for bad in ("cars", [1], [""], ["a|b"], ["ca\x00rs"]):
        with pytest.raises(RequestError) as err:
            parse_request({"vector": [1.0] * DIM, "filters": {"labels": bad}}, 50)
        assert err.value.code == "bad-request"


@pytest.fixture()
def ml_config(tmp_path: Path) -> Path:
    """A config with the multi-label colour bundle and reference chips: pure colours hold
    one label, yellow ones urban AND vegetation."""
    bundle = build_colour_bundle(tmp_path / "bundle", multi_label=True)
    refs = tmp_path / "refs"
    colours = {**PURE, "yellow": (200, 200, 30)}
    for name, colour in colours.items():
        (refs / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (40, 40), tuple(min(255, c + 5 * i) for c in colour)).save(
                refs / name / f"{name}{i}.png")
    config = tmp_path / "appliance.yaml"
    config.write_text(yaml.safe_dump({
        "paths": {"inbox": "inbox", "results": "results", "failed": "failed", "state": "state"},
        "model": {"bundle": str(bundle), "providers": ["cpu"]},
        "retrieval": {"allowed_dirs": ["refs"]},
    }))
    return config


def test_cli_query_with_labels_keeps_rows_holding_all(ml_config: Path) -> None:
    runner = CliRunner()
    refs = ml_config.parent / "refs"
    added = runner.invoke(app, ["index", "add", "--config", str(ml_config), str(refs)])
    assert added.exit_code == 0, added.output
    args = ["query", "--config", str(ml_config), "--image", str(refs / "urban" / "urban0.png"),
            "-k", "20", "--json"]
    everything = json.loads(runner.invoke(app, args).output)["results"]
    assert len(everything) == 8
    assert {tuple(r["labels"]) for r in everything} == {
        ("urban",), ("vegetation",), ("water",), ("urban", "vegetation")}
    got = runner.invoke(app, [*args, "--label", "urban", "--label", "vegetation"])
    assert got.exit_code == 0, got.output
    results = json.loads(got.output)["results"]
    assert sorted(r["source"] for r in results) == ["yellow/yellow0.png", "yellow/yellow1.png"]


def test_mqtt_query_with_label_filter(broker: Broker, tmp_path: Path, index: TileIndex) -> None:
    service = RetrievalService(index, RetrievalConfig(), lambda: None, "n1", InputConfig())
    comms = Comms(MQTTConfig(port=broker.port, reconnect_max_delay=1), "n1",
                  Journal(tmp_path / "journal.sqlite"), lambda: "{}")
    comms.on_request("retrieval/query", service.handle_request)
    comms.start()
    assert comms.connected.wait(10)
    listener = Listener(broker.port, "terratile/n1/retrieval/response/#")
    vector = multi_label_outcome("m1", seed=1).cells.embeddings[0].tolist()
    body: dict[str, Any] = {}
    for attempt in range(50):  # the request subscription is made on connect
        listener.publish("terratile/n1/retrieval/query", json.dumps({
            "request_id": f"q{attempt}", "vector": vector, "k": 12,
            "filters": {"labels": ["urban", "water"]}}))
        try:
            got = listener.wait_for(lambda m, t=f"/q{attempt}": m.topic.endswith(t), timeout=0.3)
        except TimeoutError:
            continue
        body = json.loads(got[0].payload)
        break
    listener.close()
    comms.stop()
    # urban AND water: cells 0, 4 and 8
    assert [tuple(r["labels"]) for r in body["results"]] and all(
        {"urban", "water"} <= set(r["labels"]) for r in body["results"])
    assert len(body["results"]) == 3
