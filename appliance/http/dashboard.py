"""What the dashboard shows, gathered from the parts that own it.

Recent scenes and their drift scores come from the journal (a done scene keeps its result
payload there, so the page and MQTT subscribers see the same figures); the status from
the telemetry; model versions and their gate figures from the model store's manifests;
neighbours of a cell from the retrieval service, asked exactly as an MQTT query is. Files
are served only from inside the node's own folders: a scene's outputs from
``paths.results/<scene_id>/`` and thumbnails from the inputs kept in ``processed/``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from appliance.config import Settings
from appliance.contract.bundle import BundleError, read_manifest
from appliance.contract.payloads import DriftScores, ModelRef, SceneResult, StatusPayload
from appliance.contract.raster_open import RasterRefused
from appliance.http.health import Health, Readiness, free_bytes
from appliance.http.rendering import OutsideScene, Overlay, cell_thumbnail, landuse_overlay
from appliance.ingest.journal import Journal, SceneRecord
from appliance.model.commands import ModelCommands
from appliance.model.host import ModelHost
from appliance.retrieval.query import Reply
from appliance.retrieval.service import RetrievalService
from appliance.telemetry import Telemetry

log = logging.getLogger(__name__)

RECENT_SCENES = 50
COMMAND_WAIT_S = 10.0  # a rollback answered as queued when the loop is busy longer


class NotFound(LookupError):
    """What was asked for does not exist (HTTP 404)."""


class View(BaseModel):
    """A read-only object the page receives as JSON."""

    model_config = ConfigDict(frozen=True)


class SceneView(View):
    """One scene of the recent list."""

    scene_id: str
    source: str
    state: str
    updated: str
    reason: str | None = None
    message: str | None = None
    model: ModelRef | None = None
    bounds_wgs84: tuple[float, float, float, float] | None = None
    classes: dict[str, float] = {}
    mean_confidence: float | None = None
    tiles: int | None = None
    seconds: float | None = None
    drift: DriftScores | None = None
    drifting: bool | None = None
    quicklook: bool = False
    overlay: bool = False


class ModelView(View):
    """One installed model version with the figures that let it run."""

    version: int
    parent: int | None
    active: bool
    name: str
    created: str
    notes: str
    experts: list[str]
    gate: dict[str, Any] | None = None  # the adaptation gate that promoted it
    figures: dict[str, float] = {}  # the exported bundle's evaluation figures


class StatusView(View):
    """The status panel: the retained status plus what only the box itself knows."""

    status: StatusPayload
    outbox_depth: int
    mqtt_connected: bool | None  # None: MQTT is off
    disk_free_mb: dict[str, float]
    readiness: dict[str, Any]
    index_vectors: int | None


class CommandOutcome(View):
    """What a model command from the page did."""

    done: bool  # False: still queued behind the current scene
    changed: bool
    model: ModelRef


class Dashboard:
    """Reads for the page, and the one write it offers (model rollback)."""

    def __init__(self, settings: Settings, telemetry: Telemetry, journal: Journal,
                 host: ModelHost, health: Health, retrieval: RetrievalService | None,
                 commands: ModelCommands,
                 mqtt_connected: Callable[[], bool] | None) -> None:
        self.settings = settings
        self._telemetry = telemetry
        self._journal = journal
        self._host = host
        self._health = health
        self._retrieval = retrieval
        self._commands = commands
        self._mqtt_connected = mqtt_connected
        self._overlay = lru_cache(maxsize=32)(landuse_overlay)
        self._models_lock = threading.Lock()
        self._models: tuple[object, list[ModelView]] | None = None

    # -- reads ------------------------------------------------------------------------------

    def status(self) -> StatusView:
        disks = {}
        for name, folder in self._health.disks().items():
            try:
                disks[name] = round(free_bytes(folder) / 1024 / 1024, 1)
            except OSError:
                continue
        readiness: Readiness = self._health.readiness()
        index = self._retrieval.index.count() if self._retrieval is not None else None
        return StatusView(status=self._telemetry.status(),
                          outbox_depth=self._journal.outbox_depth(),
                          mqtt_connected=(self._mqtt_connected()
                                          if self._mqtt_connected is not None else None),
                          disk_free_mb=disks, readiness=readiness.as_dict(),
                          index_vectors=index)

    def scenes(self, limit: int = RECENT_SCENES) -> list[SceneView]:
        """The scenes that changed last, newest first."""
        return [self._view(record, updated) for record, updated in self._journal.recent(limit)]

    def models(self) -> list[ModelView]:
        """Installed versions that verify, newest first. Verifying hashes every file of
        every version, so the list is remembered until a version folder or the active
        pointer changes."""
        store = self._host.store
        key = (store.active_version(),
               tuple(sorted((p.name, p.stat().st_mtime_ns) for p in store.root.iterdir()
                            if p.is_dir())))
        with self._models_lock:
            if self._models is None or self._models[0] != key:
                self._models = (key, self._read_models())
            return self._models[1]

    def _read_models(self) -> list[ModelView]:
        out = []
        for v in reversed(self._host.store.versions()):
            try:
                manifest = read_manifest(v.path)
            except (BundleError, OSError, ValueError):
                continue
            adaptation = manifest.metrics.get("adaptation")
            gate = adaptation.get("gate") if isinstance(adaptation, dict) else None
            figures = {k: float(x) for k, x in manifest.metrics.items()
                       if isinstance(x, (int, float)) and not isinstance(x, bool)}
            parity = manifest.metrics.get("parity")
            fp32 = parity.get("fp32") if isinstance(parity, dict) else None
            if isinstance(fp32, dict) and isinstance(fp32.get("max_abs_diff"), float):
                figures["parity_max_abs_diff"] = fp32["max_abs_diff"]  # ONNX vs torch
            out.append(ModelView(version=v.version, parent=v.parent, active=v.active,
                                 name=v.name, created=manifest.created.isoformat(),
                                 notes=manifest.notes, experts=v.experts, gate=gate,
                                 figures=figures))
        return out

    def overlay(self, scene_id: str) -> Overlay:
        """The scene's land-use map for the web map (cached: outputs never change)."""
        path = self._output(scene_id, "landuse")
        return self._overlay(path)

    def quicklook(self, scene_id: str) -> Path:
        return self._output(scene_id, "quicklook")

    def neighbours(self, scene_id: str, lon: float, lat: float, k: int) -> Reply:
        """The cells nearest the one at ``lon, lat`` of ``scene_id``, as a retrieval reply."""
        if self._retrieval is None:
            raise NotFound("retrieval is off on this node")
        return self._retrieval.answer({"scene_id": scene_id, "lonlat": [lon, lat], "k": k},
                                      remote=True)

    def thumbnail(self, scene_id: str, window: tuple[int, int, int, int]) -> bytes:
        """A PNG of one cell of a processed scene, read from its input in ``processed/``."""
        record = self._journal.get(scene_id)
        if record is None:
            raise NotFound(f"scene {scene_id} is not in the journal")
        folder = self.settings.paths.processed_dir.resolve()
        path = (folder / record.source).resolve()
        if not path.is_relative_to(folder) or not path.is_file():
            raise NotFound(f"{record.source} is not kept in processed/")
        cfg = self.settings.input
        try:
            return cell_thumbnail(path, window, cfg.drivers, cfg.max_pixels)
        except (RasterRefused, OutsideScene) as exc:
            raise NotFound(f"{record.source}: {exc}") from exc

    # -- the write ------------------------------------------------------------------------

    def rollback(self) -> CommandOutcome:
        """Queue ``cmd/rollback`` on the main loop, as MQTT does; wait a little for it."""
        before = self._host.bundle.version
        done = threading.Event()
        self._commands.rollback(then=done.set)
        finished = done.wait(COMMAND_WAIT_S)
        bundle = self._host.bundle
        return CommandOutcome(done=finished, changed=bundle.version != before,
                              model=ModelRef.of(bundle.manifest))

    # -- helpers ----------------------------------------------------------------------------

    def _result(self, record: SceneRecord) -> SceneResult | None:
        if record.result is None:
            return None
        try:
            return SceneResult.model_validate_json(record.result)
        except ValidationError:
            log.warning("scene %s: stored result does not parse", record.scene_id[:12])
            return None

    def _output(self, scene_id: str, key: str) -> Path:
        """An output file of a done scene, only from inside ``paths.results``."""
        record = self._journal.get(scene_id)
        result = self._result(record) if record is not None else None
        if result is None or key not in result.outputs:
            raise NotFound(f"scene {scene_id} has no {key}")
        root = self.settings.paths.results.resolve()
        path = Path(result.outputs[key]).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise NotFound(f"scene {scene_id}: {key} is not in the results folder")
        return path

    def _view(self, record: SceneRecord, updated: float) -> SceneView:
        when = datetime.fromtimestamp(updated, timezone.utc).isoformat()
        result = self._result(record)
        if result is None:
            return SceneView(scene_id=record.scene_id, source=record.source, state=record.state,
                             updated=when, reason=record.reason, message=record.message)
        drift = result.drift
        return SceneView(
            scene_id=record.scene_id, source=record.source, state=record.state, updated=when,
            model=result.model, bounds_wgs84=result.bounds_wgs84,
            classes={name: share.fraction for name, share in result.classes.items()},
            mean_confidence=result.mean_confidence, tiles=result.tiles,
            seconds=result.timings.get("total"),
            drift=drift.scene if drift is not None else None,
            drifting=drift.drifting if drift is not None else None,
            quicklook="quicklook" in result.outputs, overlay="landuse" in result.outputs)


def as_json(views: View | list[Any]) -> str:
    """JSON text of a view or a list of views."""
    if isinstance(views, View):
        return views.model_dump_json(by_alias=True)
    return json.dumps([v.model_dump(mode="json", by_alias=True) for v in views])
