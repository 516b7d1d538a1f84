"""A retrieval query and its reply: parsed and validated here only, one envelope for both ways in.

A query names what to look for in exactly one way: an image file, an indexed cell (scene
id plus pixel ``col,row`` or ``lon,lat``) or a raw vector; filters restrict the results by
class, scene and time range. ``parse_request`` turns a decoded JSON object into a typed
``Query`` or raises ``RequestError`` with the reply's error code (``bad-json``,
``bad-request``, …). The request's ``request_id`` is checked here and nowhere else: Comms
addresses a 3.1.1 client's reply by the ``request_id`` the reply carries.

``Reply`` is the one envelope, ``terratile.retrieval-response/1``, of an MQTT reply and of
``terratile query --json``: ``schema``, ``msg_id``, ``node_id``, ``request_id``, then either
``query`` and ``results`` or ``error`` {code, message}, then ``took_ms`` and ``ts``.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from appliance.retrieval.entry_log import Filters
from appliance.retrieval.index import Hit

RESPONSE_SCHEMA = "terratile.retrieval-response/1"
MAX_REQUEST_ID = 128
REQUEST_KEYS = frozenset({"request_id", "image", "scene_id", "pixel", "lonlat", "vector", "k",
                          "filters", "schema"})
FILTER_KEYS = frozenset({"class", "scene_id", "since", "until"})
DEFAULT_K = 20


class RequestError(Exception):
    """A query that cannot be answered; ``code`` is the machine-readable slug of the reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Query:
    """One validated query: exactly one of image, cell (scene + point) or vector."""

    k: int
    image: Path | None = None
    scene_id: str | None = None
    pixel: tuple[float, float] | None = None
    lonlat: tuple[float, float] | None = None
    vector: np.ndarray | None = None
    filters: Filters = field(default_factory=Filters)

    def describe(self) -> dict[str, Any]:
        """The query as echoed in a reply (vectors by length only)."""
        out: dict[str, Any] = {"k": self.k}
        if self.image is not None:
            out["image"] = str(self.image)
        if self.scene_id is not None:
            out["scene_id"] = self.scene_id
            out["pixel" if self.pixel else "lonlat"] = list(self.pixel or self.lonlat or ())
        if self.vector is not None:
            out["vector_dim"] = len(self.vector)
        return out


@dataclass(frozen=True)
class Reply:
    """One answer: the query and its hits, or the error that stopped it."""

    node_id: str
    request_id: str | None = None
    query: Query | None = None
    hits: list[Hit] = field(default_factory=list)
    error: RequestError | None = None
    took_ms: float = 0.0
    swept: frozenset[str] | None = None  # scenes whose outputs retention removed (None: unknown)
    msg_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    ts: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    def as_dict(self) -> dict[str, Any]:
        """The published JSON object."""
        out: dict[str, Any] = {"schema": RESPONSE_SCHEMA, "msg_id": self.msg_id,
                               "node_id": self.node_id, "request_id": self.request_id}
        if self.error is not None:
            out["error"] = {"code": self.error.code, "message": self.error.message}
        else:
            out["query"] = self.query.describe() if self.query is not None else {}
            out["results"] = [h.as_dict() for h in self.hits]
            if self.swept is not None:
                for hit, row in zip(self.hits, out["results"], strict=True):
                    row["outputs_present"] = hit.entry.scene_id not in self.swept
        out["took_ms"] = round(self.took_ms, 2)
        out["ts"] = self.ts.isoformat()
        return out


def decode(payload: bytes) -> dict[str, Any]:
    """A raw MQTT payload → the JSON object it must hold (``bad-json`` otherwise)."""
    try:
        request = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError("bad-json", f"payload is not JSON: {exc}") from exc
    except RecursionError as exc:  # valid JSON nested deeper than the parser recurses
        raise RequestError("bad-request", "payload is nested too deeply") from exc
    if not isinstance(request, dict):
        raise RequestError("bad-json", "payload must be a JSON object")
    return request


def request_id(request: Mapping[str, Any]) -> str | None:
    """The request's ``request_id``, or ``None`` if it has none.

    Comms publishes a 3.1.1 client's reply under ``…/response/<request_id>``, so it must be
    one safe topic level: printable (no NUL or other control characters, no lone
    surrogates), no ``/ # +``, at most 128 characters.
    """
    rid = request.get("request_id")
    if rid is None:
        return None
    if (not isinstance(rid, str) or not rid or len(rid) > MAX_REQUEST_ID
            or not rid.isprintable() or any(c in rid for c in "#+/")):
        raise RequestError("bad-request", f"request_id must be a string of 1..{MAX_REQUEST_ID} "
                           "printable characters without / # +")
    return rid


def parse_request(request: Mapping[str, Any], max_k: int) -> Query:
    """A decoded JSON request → a validated ``Query`` (``RequestError`` otherwise)."""
    unknown = sorted(set(request) - REQUEST_KEYS)
    if unknown:
        raise RequestError("bad-request", f"unknown keys: {unknown}")
    k = request.get("k", DEFAULT_K)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= max_k:
        raise RequestError("bad-request", f"k must be an integer in 1..{max_k}")
    filters = _filters(request.get("filters"))
    kinds = [key for key in ("image", "scene_id", "vector") if request.get(key) is not None]
    if len(kinds) != 1:
        raise RequestError("bad-request",
                           "give exactly one of image, scene_id (+pixel or lonlat), vector")
    if kinds == ["image"]:
        image = request["image"]
        if not isinstance(image, str) or not image:
            raise RequestError("bad-request", "image must be a path string")
        _check_text(image, "image")
        return Query(k=k, image=Path(image), filters=filters)
    if kinds == ["vector"]:
        vec = request["vector"]
        if not isinstance(vec, list) or not all(_is_number(v) for v in vec):
            raise RequestError("bad-request", "vector must be a list of numbers")
        return Query(k=k, vector=np.asarray(vec, np.float32), filters=filters)
    scene = request["scene_id"]
    if not isinstance(scene, str):
        raise RequestError("bad-request", "scene_id must be a string")
    _check_text(scene, "scene_id")
    pixel, lonlat = request.get("pixel"), request.get("lonlat")
    if (pixel is None) == (lonlat is None):
        raise RequestError("bad-request", "a scene query needs exactly one of pixel, lonlat")
    point = pixel if pixel is not None else lonlat
    if not (isinstance(point, list) and len(point) == 2 and all(_is_number(v) for v in point)):
        raise RequestError("bad-request", "pixel / lonlat must be a list of two numbers")
    xy = (float(point[0]), float(point[1]))
    return Query(k=k, scene_id=scene, filters=filters,
                 pixel=xy if pixel is not None else None,
                 lonlat=xy if lonlat is not None else None)


def parse_time(value: Any, key: str) -> datetime | None:
    """An ISO 8601 time (naive = UTC) or ``None``; ``RequestError`` naming ``key`` otherwise."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise RequestError("bad-request", f"{key} must be an ISO 8601 string")
    try:
        ts = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError as exc:
        raise RequestError("bad-request", f"{key}: not an ISO 8601 time: {value!r}") from exc
    return ts if ts.tzinfo else ts.replace(tzinfo=timezone.utc)


def _check_text(value: str, key: str) -> None:
    """Refuse strings the file system, SQLite or a log line cannot take: NUL or other
    control characters, lone surrogates (JSON ``\\ud800`` escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError("bad-request", f"{key} is not valid Unicode (lone surrogate)") from exc
    if not value.isprintable():
        raise RequestError("bad-request", f"{key} contains NUL or other control characters")


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _filters(raw: Any) -> Filters:
    if raw is None:
        return Filters()
    if not isinstance(raw, dict):
        raise RequestError("bad-request", "filters must be an object")
    unknown = sorted(set(raw) - FILTER_KEYS)
    if unknown:
        raise RequestError("bad-request", f"unknown filters: {unknown}")
    for key in ("class", "scene_id"):
        if raw.get(key) is not None:
            if not isinstance(raw[key], str):
                raise RequestError("bad-request", f"filters.{key} must be a string")
            _check_text(raw[key], f"filters.{key}")
    return Filters(class_name=raw.get("class"), scene_id=raw.get("scene_id"),
                   since=parse_time(raw.get("since"), "since"),
                   until=parse_time(raw.get("until"), "until"))
