"""Queries and replies without an index: typed parsing, and the one reply envelope's shape."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from appliance.retrieval.entry_log import Entry, Filters
from appliance.retrieval.index import Hit
from appliance.retrieval.query import (
    RESPONSE_SCHEMA,
    Query,
    Reply,
    RequestError,
    decode,
    parse_request,
    request_id,
)

T = datetime(2026, 5, 1, 12, tzinfo=timezone.utc)


def test_requests_become_typed_queries() -> None:
    image = parse_request({"image": "/data/a.png", "k": 3}, max_k=10)
    assert image == Query(k=3, image=Path("/data/a.png"))
    vector = parse_request({"vector": [1, 0, 2]}, max_k=50)
    assert vector.k == 20 and vector.vector is not None and vector.vector.dtype == np.float32
    assert vector.describe() == {"k": 20, "vector_dim": 3}
    cell = parse_request({"scene_id": "s", "lonlat": [10, 45], "filters": {
        "class": "water", "since": "2026-05-01T12:00:00Z", "until": "2026-05-02T00:00:00"}},
        max_k=50)
    assert cell.lonlat == (10.0, 45.0) and cell.pixel is None
    assert cell.filters == Filters(class_name="water", since=T,
                                   until=datetime(2026, 5, 2, tzinfo=timezone.utc))
    assert cell.describe() == {"k": 20, "scene_id": "s", "lonlat": [10.0, 45.0]}


def test_request_ids_and_payloads() -> None:
    assert request_id({"request_id": "q-1"}) == "q-1" and request_id({}) is None
    with pytest.raises(RequestError, match="request_id") as bad:
        request_id({"request_id": "a/b"})
    assert bad.value.code == "bad-request"
    assert decode(b'{"k": 1}') == {"k": 1}
    for payload in (b"[1]", b"{no", b"\xff"):
        with pytest.raises(RequestError) as err:
            decode(payload)
        assert err.value.code == "bad-json"


def test_a_reply_with_results_has_the_published_shape() -> None:
    cell = Entry(scene_id="s", source="s.tif", window=(0, 16, 16, 16), crs="EPSG:32633",
                 transform=(0.125, 0.0, 0.0, 0.0, -0.125, 5.0),
                 bounds_wgs84=(10.0, 45.0, 10.1, 45.1),
                 class_name="water", confidence=0.9)
    ref = Entry(scene_id="ref:ab", source="water/a.png", class_name="water", label="water")
    reply = Reply(node_id="n1", request_id="q1", query=Query(k=2, scene_id="s", pixel=(1, 2)),
                  hits=[Hit(7, 0.98765432, cell, T), Hit(9, 0.5, ref, T)], took_ms=1.234,
                  msg_id="m", ts=T)
    out = reply.as_dict()
    assert list(out) == ["schema", "msg_id", "node_id", "request_id", "query", "results",
                         "took_ms", "ts"]
    assert out["schema"] == RESPONSE_SCHEMA and out["took_ms"] == 1.23
    assert out["query"] == {"k": 2, "scene_id": "s", "pixel": [1, 2]}
    assert out["results"][0] == {
        "id": 7, "score": 0.987654, "scene_id": "s", "source": "s.tif",
        "window": [0, 16, 16, 16], "crs": "EPSG:32633", "bounds": [0.0, 1.0, 2.0, 3.0],
        "bounds_wgs84": [10.0, 45.0, 10.1, 45.1], "class": "water", "confidence": 0.9,
        "label": None, "labels": None, "time": T.isoformat()}
    assert out["results"][1]["window"] is None and out["results"][1]["bounds"] is None


def test_an_error_reply_has_no_query_or_results() -> None:
    out = Reply(node_id="n1", error=RequestError("no-cell", "nothing there")).as_dict()
    assert list(out) == ["schema", "msg_id", "node_id", "request_id", "error", "took_ms", "ts"]
    assert out["error"] == {"code": "no-cell", "message": "nothing there"}
    assert out["request_id"] is None and len(out["msg_id"]) == 32


@pytest.mark.parametrize("request_", [
    {"image": "/data/a\x00.png"},
    {"image": "/data/\ud800.png"},
    {"scene_id": "s\x00", "pixel": [0, 0]},
    {"scene_id": "\udfff", "pixel": [0, 0]},
    {"vector": [1.0], "filters": {"class": "w\x00"}},
    {"vector": [1.0], "filters": {"scene_id": "\ud800"}},
])
def test_nul_and_lone_surrogates_are_bad_requests(request_: dict[str, object]) -> None:
    with pytest.raises(RequestError) as err:
        parse_request(request_, max_k=10)
    assert err.value.code == "bad-request"


def test_deeply_nested_json_is_a_bad_request() -> None:
    with pytest.raises(RequestError) as err:
        decode(b"[" * 100_000 + b"]" * 100_000)
    assert err.value.code == "bad-request" and "nested" in err.value.message
