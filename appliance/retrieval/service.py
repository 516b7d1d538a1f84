"""Retrieval queries: parse and validate a request, embed what needs embedding, search.

A query names what to look for in exactly one way: an image file (run through the
backbone and embedder), an indexed cell (scene id plus pixel ``col,row`` or ``lon,lat``;
the cell itself is left out of its own results) or a raw vector. Filters restrict the
results by class, scene and time range.

``RetrievalService.handle_request`` is the MQTT entry point: it always returns a JSON-able
reply, ``terratile.retrieval-response/1``, with either ``results`` or an ``error``
{code, message}; malformed JSON, wrong types, a ``k`` out of range, an unknown scene or a
path outside ``retrieval.allowed_dirs`` (symlinks and ``..`` resolved first) are error
replies, never exceptions. This module alone parses and validates a request, its
``request_id`` included: Comms hands over the raw payload and addresses a 3.1.1 client's
reply by the ``request_id`` the reply carries (``None`` when it was missing or invalid).
The local CLI calls ``run`` directly: its user already has the file system, so
``allowed_dirs`` guards only remote requests.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from PIL import Image, UnidentifiedImageError
from rasterio.enums import Resampling
from rasterio.errors import RasterioIOError

from appliance.config import RetrievalConfig
from appliance.contract.image_files import IMAGE_SUFFIXES, is_image, is_raster
from appliance.model.runtime import ModelRuntime
from appliance.retrieval.index import Filters, Hit, TileIndex

log = logging.getLogger(__name__)

RESPONSE_SCHEMA = "terratile.retrieval-response/1"
MAX_REQUEST_ID = 128


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


def load_image(path: Path, runtime: ModelRuntime, bands: Sequence[int] | None = None) -> np.ndarray:
    """An image file as one [C,S,S] float32 tile in the model's value range.

    JPEG/PNG are read with pillow, GeoTIFF chips with rasterio (decimated read straight to
    the input size, so a large file is never read whole). 8-bit values map linearly onto
    the model's value range; other types get a 2–98 % per-band stretch.
    """
    spec = runtime.manifest.input
    size, n_bands = spec.size, len(spec.bands)
    if is_raster(path):
        try:
            with rasterio.open(path) as src:
                idx = list(bands) if bands else list(range(1, n_bands + 1))
                if len(idx) != n_bands or max(idx) > src.count:
                    raise RequestError("bad-image", f"{path.name}: has {src.count} bands, the "
                                       f"model needs {n_bands} (input.bands: {idx})")
                data = src.read(idx, out_shape=(n_bands, size, size),
                                resampling=Resampling.bilinear)
        except RasterioIOError as exc:
            raise RequestError("bad-image", f"{path.name}: unreadable raster: {exc}") from exc
    else:
        try:
            with Image.open(path) as img:
                mode = "L" if n_bands == 1 else "RGB"
                if n_bands not in (1, 3):
                    raise RequestError("bad-image", f"{path.name}: the model needs {n_bands} "
                                       "bands; use a GeoTIFF chip")
                pic = img.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
                data = np.asarray(pic).reshape(size, size, n_bands).transpose(2, 0, 1)
        except (UnidentifiedImageError, OSError) as exc:
            raise RequestError("bad-image", f"{path.name}: unreadable image: {exc}") from exc
    lo, hi = spec.value_range
    if data.dtype == np.uint8:
        out = data.astype(np.float32) * np.float32((hi - lo) / 255.0) + np.float32(lo)
    else:
        flat = data.reshape(n_bands, -1).astype(np.float64)
        p2, p98 = np.percentile(flat, [2, 98], axis=1)
        scale = (hi - lo) / np.maximum(p98 - p2, 1e-9)
        out = ((data - p2[:, None, None]) * scale[:, None, None] + lo).clip(lo, hi)
    return out.astype(np.float32)


def embed_images(tiles: np.ndarray, runtime: ModelRuntime) -> tuple[np.ndarray, np.ndarray]:
    """[N,C,S,S] tiles → (L2-normalised embeddings [N,E], class probabilities [N,K])."""
    inference = runtime.infer(tiles)
    return inference.embedding, inference.probs


class RetrievalService:
    """Answers retrieval queries against a ``TileIndex``.

    ``runtime`` is a callable so that the service always embeds with the daemon's current
    model (it may be reloaded); it may return ``None`` when no model is loaded, and then
    image queries get an error reply while cell and vector queries still work.
    """

    def __init__(self, index: TileIndex, cfg: RetrievalConfig,
                 runtime: Callable[[], ModelRuntime | None], node_id: str = "edge-01",
                 bands: Sequence[int] | None = None) -> None:
        self.index = index
        self.cfg = cfg
        self.runtime = runtime
        self.node_id = node_id
        self.bands = bands
        self.allowed = [Path(d).resolve() for d in cfg.allowed_dirs]

    def handle_request(self, payload: bytes) -> dict[str, Any]:
        """One MQTT request → one reply dict; never raises on bad input."""
        reply: dict[str, Any] = {"schema": RESPONSE_SCHEMA, "msg_id": uuid.uuid4().hex,
                                 "node_id": self.node_id, "request_id": None}
        t0 = time.perf_counter()
        try:
            request = self._decode(payload)
            reply["request_id"] = _request_id(request)
            query = self.parse(request)
            if query.image is not None:
                self._check_path(query.image)
            hits = self.run(query)
            reply["query"] = query.describe()
            reply["results"] = [h.as_dict() for h in hits]
        except RequestError as exc:
            reply["error"] = {"code": exc.code, "message": exc.message}
        except Exception as exc:  # a bug must not take the MQTT thread down: reply, log it
            log.exception("retrieval request failed")
            reply["error"] = {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}
        reply["took_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        reply["ts"] = datetime.now(timezone.utc).isoformat()
        return reply

    def parse(self, request: dict[str, Any]) -> Query:
        """A decoded JSON request → a validated ``Query`` (``RequestError`` otherwise)."""
        known = {"request_id", "image", "scene_id", "pixel", "lonlat", "vector", "k", "filters",
                 "schema"}
        unknown = sorted(set(request) - known)
        if unknown:
            raise RequestError("bad-request", f"unknown keys: {unknown}")
        k = request.get("k", 20)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.cfg.max_k:
            raise RequestError("bad-request", f"k must be an integer in 1..{self.cfg.max_k}")
        filters = _filters(request.get("filters"))
        kinds = [key for key in ("image", "scene_id", "vector") if request.get(key) is not None]
        if len(kinds) != 1:
            raise RequestError("bad-request",
                               "give exactly one of image, scene_id (+pixel or lonlat), vector")
        if kinds == ["image"]:
            image = request["image"]
            if not isinstance(image, str) or not image:
                raise RequestError("bad-request", "image must be a path string")
            return Query(k=k, image=Path(image), filters=filters)
        if kinds == ["vector"]:
            vec = request["vector"]
            if not isinstance(vec, list) or not all(_is_number(v) for v in vec):
                raise RequestError("bad-request", "vector must be a list of numbers")
            return Query(k=k, vector=np.asarray(vec, np.float32), filters=filters)
        scene = request["scene_id"]
        if not isinstance(scene, str):
            raise RequestError("bad-request", "scene_id must be a string")
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

    def run(self, query: Query) -> list[Hit]:
        """Execute a validated query (no path restriction: callers check remote paths)."""
        filters = query.filters
        if query.vector is not None:
            vector = query.vector
        elif query.image is not None:
            vector = self.embed_file(query.image)
        else:
            assert query.scene_id is not None
            if not self.index.has_scene(query.scene_id):
                raise RequestError("unknown-scene", f"scene {query.scene_id} is not indexed")
            cell = self.index.find_cell(query.scene_id, query.pixel, query.lonlat)
            if cell is None:
                where = f"pixel {query.pixel}" if query.pixel else f"lon/lat {query.lonlat}"
                raise RequestError("no-cell", f"no indexed cell of {query.scene_id} at {where}")
            try:
                vector = self.index.vector(cell)
            except KeyError as exc:  # the scene was re-indexed between the two look-ups
                raise RequestError("no-cell", f"cell of {query.scene_id} was replaced; "
                                   "ask again") from exc
            filters = Filters(filters.class_name, filters.scene_id, filters.since,
                              filters.until, filters.exclude_ids | {cell})
        if vector.shape != (self.index.dim,):
            raise RequestError("bad-request",
                               f"vector has {vector.size} values, the index holds {self.index.dim}")
        norm = float(np.linalg.norm(vector))
        if not math.isfinite(norm) or norm == 0:
            raise RequestError("bad-request", "vector must be finite and non-zero")
        return self.index.search(vector / norm, query.k, filters)

    def embed_file(self, path: Path) -> np.ndarray:
        """One image file → its L2-normalised embedding with the current model."""
        runtime = self.runtime()
        if runtime is None:
            raise RequestError("no-model", "no model is loaded; image queries are unavailable")
        if not path.is_file():
            raise RequestError("not-found", f"{path}: no such file")
        if not is_image(path):
            raise RequestError("bad-image", f"{path.name}: not one of {sorted(IMAGE_SUFFIXES)}")
        tile = load_image(path, runtime, self.bands)
        return embed_images(tile[None], runtime)[0][0]

    def _decode(self, payload: bytes) -> dict[str, Any]:
        try:
            request = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RequestError("bad-json", f"payload is not JSON: {exc}") from exc
        if not isinstance(request, dict):
            raise RequestError("bad-json", "payload must be a JSON object")
        return request

    def _check_path(self, path: Path) -> None:
        """Refuse any path that, resolved, is not inside one of ``allowed_dirs``."""
        resolved = path.resolve()
        if not any(resolved.is_relative_to(d) for d in self.allowed):
            raise RequestError("forbidden-path",
                               f"{path} is outside retrieval.allowed_dirs")


def _request_id(request: dict[str, Any]) -> str | None:
    """The request's ``request_id``, or ``None`` if it has none.

    The only check of it anywhere: Comms publishes a 3.1.1 client's reply under
    ``…/response/<request_id>``, so it must be one safe topic level: printable (no NUL or
    other control characters, no lone surrogates), no ``/ # +``, at most 128 characters.
    """
    rid = request.get("request_id")
    if rid is None:
        return None
    if (not isinstance(rid, str) or not rid or len(rid) > MAX_REQUEST_ID
            or not rid.isprintable() or any(c in rid for c in "#+/")):
        raise RequestError("bad-request", f"request_id must be a string of 1..{MAX_REQUEST_ID} "
                           "printable characters without / # +")
    return rid


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _filters(raw: Any) -> Filters:
    if raw is None:
        return Filters()
    if not isinstance(raw, dict):
        raise RequestError("bad-request", "filters must be an object")
    unknown = sorted(set(raw) - {"class", "scene_id", "since", "until"})
    if unknown:
        raise RequestError("bad-request", f"unknown filters: {unknown}")
    for key in ("class", "scene_id"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise RequestError("bad-request", f"filters.{key} must be a string")
    return Filters(class_name=raw.get("class"), scene_id=raw.get("scene_id"),
                   since=parse_time(raw.get("since"), "since"),
                   until=parse_time(raw.get("until"), "until"))


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
