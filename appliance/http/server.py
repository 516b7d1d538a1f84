"""The HTTP server: the dashboard at ``/``, its JSON API, ``/metrics``, the health probes.

Starlette routes on uvicorn, on a thread of its own beside the main loop; it only reads
(through ``Dashboard``, ``Metrics``, ``Health``) and queues the one write, a model
rollback, on the main loop like an MQTT command. Every asset of the page ships in
``static/`` (Leaflet and uPlot vendored, pinned, with their licences): the page works
without internet access. A port that is taken is logged as an error and the node runs on
without its HTTP face: scenes matter more than the dashboard.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from appliance.config import HTTPConfig, Settings
from appliance.http.access import Access
from appliance.http.dashboard import Dashboard, NotFound, as_json
from appliance.http.events import Events
from appliance.http.health import Health
from appliance.http.metrics import Metrics, Sources
from appliance.ingest.journal import Journal
from appliance.model.commands import ModelCommands
from appliance.model.host import ModelHost
from appliance.retrieval.index import TileIndex
from appliance.retrieval.service import RetrievalService
from appliance.telemetry import State, Telemetry

log = logging.getLogger(__name__)

STATIC = Path(__file__).with_name("static")
MAX_K = 24
MAX_WINDOW = 4096  # px: the largest cell a thumbnail is cut from (read decimated)
START_TIMEOUT_S = 10.0


def json_text(text: str, status: int = 200) -> Response:
    return Response(text, status_code=status, media_type="application/json")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def build_app(dashboard: Dashboard, metrics: Metrics, health: Health, events: Events,
              access: Access) -> Starlette:
    """The routes; every handler that touches disk or SQLite runs in the thread pool."""

    def guarded(request: Request) -> JSONResponse | None:
        return None if access.may_read(request) else _error(401, "token required")

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def healthz(request: Request) -> Response:
        return JSONResponse({"alive": True})

    async def readyz(request: Request) -> Response:
        verdict = await run_in_threadpool(health.readiness)
        return JSONResponse(verdict.as_dict(), status_code=200 if verdict.ready else 503)

    async def prometheus(request: Request) -> Response:
        if (denied := guarded(request)) is not None:
            return denied
        body = await run_in_threadpool(metrics.exposition)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    async def status(request: Request) -> Response:
        if (denied := guarded(request)) is not None:
            return denied
        view = await run_in_threadpool(dashboard.status)
        return json_text(as_json(view))

    async def scenes(request: Request) -> Response:
        if (denied := guarded(request)) is not None:
            return denied
        return json_text(as_json(await run_in_threadpool(dashboard.scenes)))

    async def models(request: Request) -> Response:
        if (denied := guarded(request)) is not None:
            return denied
        body = as_json(await run_in_threadpool(dashboard.models))
        return json_text(f'{{"writes_enabled": {str(access.writes_enabled).lower()}, '
                         f'"versions": {body}}}')

    async def overlay(request: Request) -> Response:
        if (denied := guarded(request)) is not None:
            return denied
        try:
            picture = await run_in_threadpool(dashboard.overlay, request.path_params["scene_id"])
        except NotFound as exc:
            return _error(404, str(exc))
        if request.url.path.endswith(".png"):
            return Response(picture.png, media_type="image/png")
        return JSONResponse({"bounds": picture.bounds})

    async def quicklook(request: Request) -> Response:
        if (denied := guarded(request)) is not None:
            return denied
        try:
            path = await run_in_threadpool(dashboard.quicklook, request.path_params["scene_id"])
        except NotFound as exc:
            return _error(404, str(exc))
        return FileResponse(path, media_type="image/png")

    async def neighbours(request: Request) -> Response:
        if (denied := guarded(request)) is not None:
            return denied
        try:
            lon = float(request.query_params["lon"])
            lat = float(request.query_params["lat"])
            k = int(request.query_params.get("k", "8"))
        except (KeyError, ValueError):
            return _error(400, "give lon, lat (numbers) and optionally k")
        if not 1 <= k <= MAX_K:
            return _error(400, f"k must be 1..{MAX_K}")
        try:
            reply = await run_in_threadpool(dashboard.neighbours,
                                            request.path_params["scene_id"], lon, lat, k)
        except NotFound as exc:
            return _error(404, str(exc))
        return JSONResponse(reply.as_dict())

    async def thumbnail(request: Request) -> Response:
        if (denied := guarded(request)) is not None:
            return denied
        try:
            parts = [int(v) for v in request.query_params["window"].split(",")]
            if (len(parts) != 4 or min(parts[2:]) < 1 or min(parts[:2]) < 0
                    or max(parts[2:]) > MAX_WINDOW):
                raise ValueError(parts)
        except (KeyError, ValueError):
            return _error(400, f"window must be col,row,width,height (at most {MAX_WINDOW} px)")
        window = (parts[0], parts[1], parts[2], parts[3])
        try:
            png = await run_in_threadpool(dashboard.thumbnail, request.path_params["scene_id"],
                                          window)
        except NotFound as exc:
            return _error(404, str(exc))
        return Response(png, media_type="image/png",
                        headers={"Cache-Control": "private, max-age=3600"})

    async def rollback(request: Request) -> Response:
        if not access.writes_enabled:
            return _error(403, "set http.token_file to change the model from the dashboard")
        if not access.may_write(request):
            return _error(401, "the token is required (Authorization: Bearer …)")
        outcome = await run_in_threadpool(dashboard.rollback)
        return json_text(as_json(outcome), status=200 if outcome.done else 202)

    async def stream(request: Request) -> Response:
        if (denied := guarded(request)) is not None:
            return denied

        def render() -> str:
            return as_json(dashboard.status())

        return StreamingResponse(events.stream(render), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-store",
                                          "X-Accel-Buffering": "no"})

    routes = [
        Route("/", index),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", prometheus),
        Route("/api/status", status),
        Route("/api/scenes", scenes),
        Route("/api/scenes/{scene_id:str}/overlay", overlay),
        Route("/api/scenes/{scene_id:str}/overlay.png", overlay),
        Route("/api/scenes/{scene_id:str}/quicklook.png", quicklook),
        Route("/api/scenes/{scene_id:str}/neighbours", neighbours),
        Route("/api/scenes/{scene_id:str}/thumbnail.png", thumbnail),
        Route("/api/models", models),
        Route("/api/models/rollback", rollback, methods=["POST"]),
        Route("/api/events", stream),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    return Starlette(routes=routes)


class HTTPServer:
    """uvicorn serving the app on its own thread; ``start`` binds, ``stop`` ends it."""

    def __init__(self, cfg: HTTPConfig, app: Starlette, events: Events, metrics: Metrics
                 ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self._events = events
        self._server = uvicorn.Server(uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off",
            timeout_graceful_shutdown=2))
        self._thread: threading.Thread | None = None
        self.url: str | None = None

    def start(self) -> bool:
        """Bind and serve; False (logged) when the address cannot be bound."""
        try:
            sock = socket.create_server((self.cfg.host, self.cfg.port),
                                        family=socket.AF_INET6 if ":" in self.cfg.host
                                        else socket.AF_INET)
        except (OSError, OverflowError) as exc:
            log.error("dashboard and metrics off: cannot listen on %s:%d: %s",
                      self.cfg.host, self.cfg.port, getattr(exc, "strerror", None) or exc)
            return False
        self._thread = threading.Thread(target=self._serve, args=(sock,), name="http",
                                        daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self._server.started and self._thread.is_alive():
            if time.monotonic() > deadline:
                log.error("the HTTP server did not start within %.0f s", START_TIMEOUT_S)
                return False
            time.sleep(0.02)
        host = f"[{self.cfg.host}]" if ":" in self.cfg.host else self.cfg.host
        self.url = f"http://{host}:{sock.getsockname()[1]}/"
        log.info("dashboard at %s (metrics at %smetrics)", self.url, self.url)
        return True

    def _serve(self, sock: socket.socket) -> None:
        asyncio.run(self._server.serve(sockets=[sock]))

    def stop(self) -> None:
        """End the event streams, then the server (open requests get two seconds)."""
        self._events.close()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


def node_server(settings: Settings, telemetry: Telemetry, journal: Journal, host: ModelHost,
                index: TileIndex | None, retrieval: RetrievalService | None,
                commands: ModelCommands,
                mqtt_connected: Callable[[], bool] | None) -> HTTPServer:
    """The node's server, wired to its parts (not started); raises ``ValueError`` or
    ``FileNotFoundError`` for an unusable ``http.token_file``."""
    access = Access(settings.http)
    health = Health(settings, host, journal,
                    lambda: telemetry.state in (State.READY, State.PROCESSING))
    metrics = Metrics(Sources(telemetry, journal, health, index, mqtt_connected))
    dashboard = Dashboard(settings, telemetry, journal, host, health, retrieval, commands,
                          mqtt_connected)
    events = Events()
    telemetry.on_change(events.publish)
    return HTTPServer(settings.http, build_app(dashboard, metrics, health, events, access),
                      events, metrics)
