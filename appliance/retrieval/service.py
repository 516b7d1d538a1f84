"""Answering retrieval queries: validate, embed what needs embedding, search, reply.

``RetrievalService.answer`` takes a request (a raw MQTT payload or a decoded object), runs
it against a ``TileIndex`` and always returns a ``Reply`` (``retrieval.query``), with
either hits or an error: malformed JSON, wrong types, a ``k`` out of range, an unknown
scene, an unreadable image or a bug are error replies, never exceptions, so a request
cannot take the MQTT thread down. ``handle_request`` is the MQTT entry point; Comms hands
over the raw payload and publishes the reply dict.

An image query is embedded with the current model (``retrieval.image`` reads the file as
the model sees it); a cell query searches with the stored vector of the indexed cell at the
point and leaves that cell out of its own results. Remote requests may only read images
inside ``retrieval.allowed_dirs`` (symlinks and ``..`` resolved first); the local CLI's
user already has the file system, so it is not restricted.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from appliance.comms.mqtt import REFUSAL_MESSAGES, Refusal
from appliance.config import InputConfig, RetrievalConfig
from appliance.contract.image_files import IMAGE_SUFFIXES, is_image
from appliance.model.runtime import ModelRuntime
from appliance.retrieval.entry_log import Filters
from appliance.retrieval.image import read_tile
from appliance.retrieval.index import Hit, TileIndex
from appliance.retrieval.query import Query, Reply, RequestError, decode, parse_request, request_id

log = logging.getLogger(__name__)

REFUSAL_PARSE_MAX = 4096  # bytes: larger payloads are refused without their request_id


class RetrievalService:
    """Answers retrieval queries against a ``TileIndex``.

    ``runtime`` is a callable so that the service always embeds with the daemon's current
    model (it may be reloaded); it may return ``None`` when no model is loaded, and then
    image queries get an error reply while cell and vector queries still work.
    """

    def __init__(self, index: TileIndex, cfg: RetrievalConfig,
                 runtime: Callable[[], ModelRuntime | None], node_id: str,
                 input_cfg: InputConfig, results_dir: Path | None = None) -> None:
        """``results_dir``: where scene outputs live; each hit then says whether its
        scene's outputs are still there (retention may have removed them)."""
        self.index = index
        self.results_dir = results_dir
        self.cfg = cfg
        self.runtime = runtime
        self.node_id = node_id
        self.input_cfg = input_cfg
        self.allowed = [Path(d).resolve() for d in cfg.allowed_dirs]

    def handle_request(self, payload: bytes) -> dict[str, Any]:
        """One MQTT request → one reply dict; never raises on bad input."""
        return self.answer(payload, remote=True).as_dict()

    def answer(self, request: bytes | Mapping[str, Any], remote: bool = False) -> Reply:
        """A raw payload or decoded request → its ``Reply``; ``remote`` restricts image paths."""
        t0 = time.perf_counter()
        rid: str | None = None
        try:
            decoded = decode(request) if isinstance(request, bytes) else request
            rid = request_id(decoded)
            query = parse_request(decoded, self.cfg.max_k)
            if remote and query.image is not None:
                self._check_path(query.image)
            hits = self.run(query)
        except RequestError as exc:
            return self._reply(t0, request_id=rid, error=exc)
        except Exception as exc:  # a bug must not take the MQTT thread down: reply, log it
            log.exception("retrieval request failed")
            failure = RequestError("internal", f"{type(exc).__name__}: {exc}")
            return self._reply(t0, request_id=rid, error=failure)
        return self._reply(t0, request_id=rid, query=query, hits=hits)

    def refusal_reply(self, payload: bytes, code: Refusal) -> dict[str, Any]:
        """The reply Comms sends when a request is not queued: ``busy`` (too many pending)
        or ``rate-limited`` (its client is over ``mqtt.client_rate``).

        It runs on the MQTT network thread, so it reads the ``request_id`` (for a 3.1.1
        client's reply topic) only from a small payload and never raises.
        """
        rid: str | None = None
        if len(payload) <= REFUSAL_PARSE_MAX:
            try:
                rid = request_id(decode(payload))
            except (RequestError, RecursionError):
                rid = None
        error = RequestError(code, REFUSAL_MESSAGES[code])
        return self._reply(time.perf_counter(), request_id=rid, error=error).as_dict()

    def refuse(self, error: RequestError) -> Reply:
        """The reply to a request that could not even be put together (e.g. by the CLI)."""
        return self._reply(time.perf_counter(), error=error)

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
        tile = read_tile(path, runtime.manifest.input, self.input_cfg)
        return runtime.infer(tile[None]).embedding[0]

    def _reply(self, t0: float, request_id: str | None = None, query: Query | None = None,
               hits: list[Hit] | None = None, error: RequestError | None = None) -> Reply:
        swept = None
        if self.results_dir is not None and hits:
            swept = frozenset(h.entry.scene_id for h in hits
                              if not (self.results_dir / h.entry.scene_id).is_dir())
        return Reply(node_id=self.node_id, request_id=request_id, query=query,
                     hits=hits or [], error=error,
                     took_ms=(time.perf_counter() - t0) * 1000, swept=swept)

    def _check_path(self, path: Path) -> None:
        """Refuse any path that, resolved, is not inside one of ``allowed_dirs``."""
        resolved = path.resolve()
        if not any(resolved.is_relative_to(d) for d in self.allowed):
            raise RequestError("forbidden-path",
                               f"{path} is outside retrieval.allowed_dirs")
