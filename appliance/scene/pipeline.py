"""One scene, end to end: read in windows → multi-scale tiles → model → fuse → outputs.

``process_scene`` is the only entry point. It never moves or modifies the input, writes
every output into ``out_dir`` and raises ``SceneError`` (with a ``reason`` slug) for input
that cannot be processed. Memory is bounded whatever the scene size: tiles stream through
a reader thread a few batches ahead of inference, and only per-cell results (fused
probabilities, one embedding) plus capped samples are kept.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import rasterio

from appliance.config import Settings
from appliance.contract.bundle import Bundle, ClassSpec, Manifest
from appliance.contract.gsd import scene_gsd
from appliance.contract.payloads import (
    Acquired,
    BandUse,
    ClassShare,
    DriftReport,
    ModelRef,
    RescaleUse,
    Resolution,
    SceneInput,
    SceneOrigin,
    SceneResult,
    result_msg_id,
)
from appliance.contract.signature import Signature, scene_signature
from appliance.scene.bands import scene_band_labels
from appliance.scene.cells import SceneCells, windows_bounds
from appliance.scene.fusion import fuse
from appliance.scene.gsd import WindowPlan, plan_windows
from appliance.scene.labels import write_label_outputs
from appliance.scene.outputs import (
    NODATA,
    ClassMap,
    bbox_wgs84,
    bounds_to_wgs84,
    cell_areas_m2,
    disk_full_guard,
    footprint_wgs84,
    write_confidence,
    write_geojson,
    write_json,
    write_landuse,
)
from appliance.scene.quicklook import Quicklook, backdrop_rgb, write_quicklook
from appliance.scene.raster import Scene, SceneError, open_scene
from appliance.scene.segments import cell_labels_on, hybrid_map, segment
from appliance.scene.source import SceneSource
from appliance.scene.stac import (
    ITEM,
    SOURCE_ITEM,
    Acquisition,
    ItemInputs,
    MapGrid,
    acquisition_time,
    build_item,
    item_dict,
    sidecar_item,
    update_catalog,
)
from appliance.scene.tiling import CellGrid, iter_batches, read_ahead

__all__ = ["SceneError", "SceneInterrupted", "SceneModel", "SceneOutcome", "process_scene"]

log = logging.getLogger(__name__)


class SceneInterrupted(Exception):
    """A stop was requested between two batches; the scene is not finished."""

SUMMARY_SCHEMA = "terratile.scene-summary/2"
FEATURE_SAMPLE = 512  # cells whose per-scale features are kept for adaptation/drift
TILE_SAMPLE = 8  # cells whose model-input tiles are kept for layer re-normalisation
PROBE_CELLS = 16  # cells read ahead of inference to measure a scene's sharpness for routing


class Inferred(Protocol):
    """One batch through the model: pooled features, probabilities, embeddings."""

    @property
    def features(self) -> np.ndarray: ...
    @property
    def probs(self) -> np.ndarray: ...
    @property
    def embedding(self) -> np.ndarray: ...


class SceneModel(Protocol):
    """What a scene needs of the model that classifies it (the box's ``ModelRuntime``):
    the bundle it runs, which expert a scene's signature routes to, and inference."""

    @property
    def bundle(self) -> Bundle: ...
    @property
    def manifest(self) -> Manifest: ...
    @property
    def input_size(self) -> int: ...
    def route(self, signature: Signature) -> str | None: ...
    def infer(self, tiles: np.ndarray, domain: str | None = None) -> Inferred: ...


@dataclass(frozen=True)
class SceneOutcome:
    """What a processed scene produced; the daemon builds its result payload from this."""

    scene_id: str
    source: str
    crs: str
    bounds: tuple[float, float, float, float]
    bounds_wgs84: tuple[float, float, float, float]
    width: int
    height: int
    fractions: dict[str, float]
    areas_ha: dict[str, float]
    mean_confidence: float
    outputs: dict[str, str]
    timings: dict[str, float]  # "read" runs in a thread beside "infer": they overlap
    tiles: int
    cells: SceneCells
    model: ModelRef  # the bundle, and the expert the scene was routed to
    input: SceneInput  # bands, rescale and resolution the scene was run with
    acquired: Acquired
    warnings: list[str]
    labels: dict[str, ClassShare] | None = None  # multi-label bundles: presence per label
    label_thresholds: dict[str, float] | None = None
    origin: SceneOrigin | None = None  # where the pixels were read from

    def result(self, node_id: str, drift: DriftReport | None) -> SceneResult:
        """The ``scene-result`` payload (its msg_id derived from the scene id)."""
        return SceneResult(
            msg_id=result_msg_id(self.scene_id), node_id=node_id, scene_id=self.scene_id,
            source=self.source, model=self.model, crs=self.crs, bounds=self.bounds,
            bounds_wgs84=self.bounds_wgs84, width=self.width, height=self.height,
            classes={name: ClassShare(fraction=self.fractions[name],
                                      area_ha=self.areas_ha.get(name, 0.0))
                     for name in self.fractions},
            mean_confidence=self.mean_confidence, outputs=self.outputs, timings=self.timings,
            tiles=self.tiles, drift=drift, input=self.input, acquired=self.acquired,
            warnings=self.warnings, labels=self.labels, origin=self.origin)


class _Sample:
    """The cells whose items a scene keeps, chosen before any inference, and their items.

    The cells to process are known up front, so a uniform sample of ``cap`` of them is one
    seeded draw (re-runs keep the same cells), and only the chosen cells' items are copied.
    """

    def __init__(self, todo: np.ndarray, cap: int, rng: np.random.Generator) -> None:
        self.chosen = np.sort(rng.choice(todo, size=min(cap, len(todo)), replace=False))
        self.keys: list[int] = []
        self.items: list[np.ndarray] = []

    def offer(self, cells: np.ndarray, items: np.ndarray, dtype: type[np.floating]) -> None:
        """Keep, as a ``dtype`` copy, the items of a batch's chosen ``cells``: a kept
        item must not pin its whole batch in memory."""
        picked = np.flatnonzero(np.isin(cells, self.chosen))
        self.keys.extend(int(c) for c in cells[picked])
        self.items.extend(items[picked].astype(dtype))


@dataclass
class _Accumulator:
    """Per-cell results filled batch by batch, plus samples of features and tiles."""

    probs: np.ndarray
    embeddings: np.ndarray
    band_means: np.ndarray
    features: _Sample
    tiles: _Sample

    def add_samples(self, cells: np.ndarray, features: np.ndarray, tiles: np.ndarray) -> None:
        """Offer cells' per-scale features [b,S,D] and model-input tiles [b,S,C,H,W]."""
        self.features.offer(cells, features, np.float32)
        self.tiles.offer(cells, tiles, np.float16)


def _probe_tiles(scene: Scene, grid: CellGrid, valid: np.ndarray, size: int) -> np.ndarray:
    """Model-input tiles [n,C,S,S] of up to ``PROBE_CELLS`` valid cells spread over the
    scene, at the middle scale: what routing measures sharpness on before any inference."""
    cells = np.flatnonzero(valid)
    pick = cells[np.linspace(0, len(cells) - 1, min(PROBE_CELLS, len(cells))).astype(np.int64)]
    scale = sorted(grid.scales)[len(grid.scales) // 2]
    return np.stack([scene.read_window(*grid.origin(int(c), scale), scale, scale, size, size)
                     for c in pick])


def _embedding_scale_index(scales: list[int], wanted: int | None) -> int:
    """Index (in ``scales``) of the scale whose embedding is kept per cell.

    The configured scale nearest to ``wanted`` if set, else the middle scale.
    """
    if wanted is None:
        wanted = sorted(scales)[len(scales) // 2]
    return int(np.argmin([abs(s - wanted) for s in scales]))


def _seed(scene_id: str) -> int:
    """A deterministic per-scene seed for the samples (re-runs sample the same cells)."""
    return int(hashlib.sha256(scene_id.encode()).hexdigest()[:8], 16)


def process_scene(
    source: SceneSource | Path, scene_id: str, out_dir: Path, runtime: SceneModel,
    settings: Settings, *, probe_sharpness: bool = False, embedding_scale: int | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> SceneOutcome:
    """Classify one scene and write its outputs into ``out_dir``; raise ``SceneError``.

    ``source`` is where its pixels are (a local file, or a remote object read in windows;
    a plain path is a local file).

    ``should_stop`` is asked before each batch; when it says yes the scene ends with
    ``SceneInterrupted`` (a daemon stop must not wait for a large scene).

    ``probe_sharpness`` measures the scene's sharpness even when the bundle has no expert
    to route to (adaptation stores it); ``embedding_scale`` is the window size whose
    embedding each cell keeps (None: the middle scale).
    """
    if not isinstance(source, SceneSource):
        source = SceneSource.file(Path(source))
    t_start = time.perf_counter()
    # rasterio hands GDAL_CACHEMAX to GDALSetCacheMax64: bytes, not MB.
    with rasterio.Env(GDAL_CACHEMAX=settings.tiling.gdal_cachemax_mb << 20,
                      **source.gdal_env()), \
            open_scene(source, settings.input, runtime.manifest.input) as scene:
        return _process(scene, source, scene_id, Path(out_dir), runtime, settings, t_start,
                        probe_sharpness, embedding_scale, should_stop)


def _process(
    scene: Scene, source: SceneSource, scene_id: str, out_dir: Path, runtime: SceneModel,
    settings: Settings, t_start: float, probe_sharpness: bool, embedding_scale: int | None,
    should_stop: Callable[[], bool],
) -> SceneOutcome:
    manifest = runtime.manifest
    gsd = scene_gsd(scene.ds.transform, scene.crs, scene.width, scene.height)
    plan = plan_windows(settings.tiling, settings.input, manifest.scales, manifest.gsd, gsd,
                        source.name)
    tiling = plan.tiling
    grid = CellGrid(scene.width, scene.height, tiling.cell_size, tuple(tiling.scales))
    valid = grid.valid(scene, tiling.nodata_fraction)
    if not valid.any():
        if max(scene.width, scene.height) < min(tiling.scales):
            raise SceneError("too-small", f"{source.name}: {scene.width}x{scene.height} px is "
                             f"smaller than the smallest window ({min(tiling.scales)} px)")
        raise SceneError("nodata", f"{source.name}: every cell is more than "
                         f"{tiling.nodata_fraction:.0%} nodata")

    band_sample = scene.band_sample()
    # Sharpness is read ahead only for those who use it: routing and adaptation.
    probe = (_probe_tiles(scene, grid, valid, runtime.input_size)
             if manifest.experts or probe_sharpness else None)
    signature = scene_signature(band_sample, probe)
    domain = runtime.route(signature)
    scene.use_spec(manifest.input_for(domain))
    n, k = len(grid), len(manifest.classes)
    n_scales = len(grid.scales)
    rng = np.random.default_rng(_seed(scene_id))
    todo = np.flatnonzero(valid)
    acc = _Accumulator(np.zeros((n, k), np.float32),
                       np.zeros((n, manifest.embedding_dim), np.float32),
                       np.zeros((n, len(manifest.input.bands)), np.float32),
                       _Sample(todo, FEATURE_SAMPLE, rng), _Sample(todo, TILE_SAMPLE, rng))
    own_scale = int(np.argmin(grid.scales))  # the window that is the cell itself
    # retrieval.scale names one of the nominal scales (configured, or the bundle's), not
    # the scene-pixel sizes they became for this scene's GSD.
    nominal = [round(x) for x in (settings.tiling.scales or manifest.scales)]
    r_index = _embedding_scale_index(nominal, embedding_scale)
    multi_label = manifest.task == "multi-label"
    t_read, t_infer = time.perf_counter() - t_start, 0.0  # opening: statistics and mask reads
    tiles = 0
    batches = iter_batches(scene, grid, todo, runtime.input_size, tiling.batch_size)
    # closing(): on an error the reader thread is joined here, before the scene closes.
    with closing(read_ahead(batches, tiling.read_ahead)) as stream:
        for batch in stream:
            if should_stop():
                raise SceneInterrupted(scene_id)
            t0 = time.perf_counter()
            out = runtime.infer(batch.tiles, domain)
            t_infer += time.perf_counter() - t0
            t_read += batch.read_seconds
            tiles += len(batch.tiles)
            b = len(batch.cells)
            probs = out.probs.reshape(b, n_scales, -1)
            acc.probs[batch.cells] = fuse(probs, tiling.fusion, tiling.weights, multi_label)
            acc.embeddings[batch.cells] = out.embedding.reshape(b, n_scales, -1)[:, r_index]
            cell_tiles = batch.tiles.reshape(b, n_scales, *batch.tiles.shape[1:])
            acc.band_means[batch.cells] = cell_tiles[:, own_scale].mean(axis=(2, 3))
            acc.add_samples(batch.cells, out.features.reshape(b, n_scales, -1), cell_tiles)

    t_write0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    with disk_full_guard(out_dir, settings.paths.min_free_mb):
        outcome = _write_outputs(scene, source, scene_id, out_dir, runtime, settings, grid, valid,
                                 acc, tiles, band_sample, domain, signature[2], plan)
        t_end = time.perf_counter()
        timings = {"read": round(t_read, 4), "infer": round(t_infer, 4),
                   "write": round(t_end - t_write0, 4), "total": round(t_end - t_start, 4)}
        outcome = replace(outcome, timings=timings)
        write_json(Path(outcome.outputs["summary"]),
                   _summary(outcome, runtime, tiling.fusion, grid))
        _write_stac(scene, out_dir, outcome, grid, plan, runtime.manifest.map_classes,
                    settings.node_id)
    log.info("scene %s: %d cells (%d valid), %d tiles, %.2fs", scene_id[:12], n,
             int(valid.sum()), tiles, timings["total"])
    return outcome


def _scene_input(scene: Scene, plan: WindowPlan) -> SceneInput:
    """How ``scene`` was fed to the model, for the result, summary and STAC item."""
    choice = scene.band_choice
    labels = scene_band_labels(scene.ds)
    r = scene.rescale
    return SceneInput(
        bands=[BandUse(band=b, index=i, label=labels[i - 1])
               for b, i in zip(choice.names, choice.indexes, strict=True)],
        band_selection=choice.how,
        rescale=RescaleUse(mode=r.mode, gain=[float(g) for g in r.gain],
                           bias=[float(b) for b in r.bias]),
        resolution=Resolution(
            scene_gsd=plan.scene_gsd, bundle_gsd=plan.bundle_gsd, matched=plan.matched,
            ratio=None if plan.ratio is None else round(plan.ratio, 4),
            windows=list(plan.tiling.scales), cell=plan.tiling.cell_size))


def _write_outputs(
    scene: Scene, source: SceneSource, scene_id: str, out_dir: Path, runtime: SceneModel,
    settings: Settings, grid: CellGrid, valid: np.ndarray, acc: _Accumulator, tiles: int,
    band_sample: np.ndarray, domain: str | None, sharp: np.ndarray | None, plan: WindowPlan,
) -> SceneOutcome:
    manifest = runtime.manifest
    classes = manifest.map_classes
    model = ModelRef.of(manifest, domain)
    out_dir.mkdir(parents=True, exist_ok=True)
    windows = grid.windows()
    transform = scene.ds.transform
    cells = SceneCells(
        scene_id=scene_id, crs=scene.crs_string, windows=windows,
        transform=(transform.a, transform.b, transform.c, transform.d, transform.e,
                   transform.f),
        bounds_wgs84=bounds_to_wgs84(windows_bounds(windows, transform), scene.crs),
        probs=acc.probs, valid=valid,
        embeddings=acc.embeddings,
        sample_index=np.asarray(acc.features.keys, np.int64),
        sample_features=(np.stack(acc.features.items) if acc.features.items
                         else np.zeros((0, len(grid.scales), manifest.feature_dim), np.float32)),
        band_sample=band_sample, domain=domain, sharpness=sharp,
        sample_tiles=np.stack(acc.tiles.items) if acc.tiles.items else None,
        band_means=acc.band_means,
    )
    labels = cells.labels
    confidence = cells.confidence
    map_labels = np.where(valid, labels, NODATA).astype(np.uint8).reshape(grid.rows, grid.cols)
    map_conf = np.where(valid, np.round(confidence * 100), NODATA).astype(np.uint8)
    cmap = ClassMap(map_labels, map_conf.reshape(grid.rows, grid.cols),
                    grid.map_transform(scene.ds.transform), scene.crs, list(classes))

    all_areas = cell_areas_m2(windows, scene.ds.transform, scene.crs)
    areas = all_areas[valid]
    valid_labels = labels[valid]
    total = float(areas.sum())
    areas_ha = {c.name: float(areas[valid_labels == i].sum() / 1e4) for i, c in enumerate(classes)}
    fractions = {c.name: (areas_ha[c.name] * 1e4 / total if total > 0 else 0.0) for c in classes}

    files = {name: out_dir / f for name, f in (
        ("landuse", "landuse.tif"), ("confidence", "confidence.tif"),
        ("summary", "summary.json"), ("geojson", "landuse.geojson"),
        ("quicklook", "quicklook.png"), ("stac", ITEM))}
    files["style"] = write_landuse(files["landuse"], cmap.labels, cmap.transform, cmap.crs,
                                   cmap.classes)
    write_confidence(files["confidence"], cmap)
    write_geojson(files["geojson"], cmap, all_areas.reshape(grid.rows, grid.cols))
    labelled = (write_label_outputs(out_dir, acc.probs, valid, areas, cmap.shape,
                                    cmap.transform, scene.crs, manifest,
                                    settings.labels.thresholds)
                if manifest.task == "multi-label" else None)
    if labelled is not None:
        files |= labelled.files
    if settings.tiling.segments != "none":
        files["hybrid"] = out_dir / "hybrid.tif"
        _write_hybrid(files["hybrid"], scene, grid, cmap, settings)
    sidecar = None if source.is_remote else sidecar_item(source.path)
    if sidecar is not None:
        files["source_item"] = out_dir / SOURCE_ITEM
        write_json(files["source_item"], sidecar)
    acquired = acquisition_time({**scene.ds.tags(), **scene.ds.tags(ns="IMAGERY")}, sidecar,
                                datetime.now(timezone.utc))
    ground_w = None if plan.scene_gsd is None else plan.scene_gsd * scene.width
    write_quicklook(files["quicklook"], Quicklook(
        labels=cmap.labels, classes=cmap.classes,
        # a multi-label legend gives each label's presence share, not its arg-max share
        fractions=({n: v.fraction for n, v in labelled.shares.items()} if labelled
                   else fractions),
        backdrop=backdrop_rgb(scene.overview, scene.overview_valid, scene.spec.bands),
        title=f"{source.name}  ·  {acquired.datetime.date().isoformat()}"
              + (" (processed)" if acquired.source == "processing" else ""),
        subtitle=f"{manifest.name} v{manifest.version}"
                 + (f" ({domain})" if domain else "")
                 + f"  ·  {grid.rows}x{grid.cols} cells  ·  windows {list(grid.scales)} px",
        ground_width_m=ground_w))

    b = scene.ds.bounds
    scene_bounds = (float(b.left), float(b.bottom), float(b.right), float(b.top))
    return SceneOutcome(
        scene_id=scene_id, source=source.name, origin=source.origin(), crs=scene.crs_string,
        bounds=scene_bounds,
        bounds_wgs84=bbox_wgs84(scene_bounds, scene.crs),
        width=scene.width, height=scene.height, fractions=fractions, areas_ha=areas_ha,
        mean_confidence=float(confidence[valid].mean()),
        outputs={key: str(f.resolve()) for key, f in files.items()},
        timings={}, tiles=tiles, cells=cells, model=model,
        input=_scene_input(scene, plan),
        acquired=Acquired(datetime=acquired.iso, source=acquired.source),
        warnings=list(plan.warnings),
        labels=labelled.shares if labelled else None,
        label_thresholds=labelled.thresholds if labelled else None,
    )


def _write_stac(scene: Scene, out_dir: Path, outcome: SceneOutcome, grid: CellGrid,
                plan: WindowPlan, classes: list[ClassSpec], node_id: str) -> None:
    """The scene's STAC item (after every other output: it carries their checksums), then
    the results catalog that links it."""
    files = {k: Path(v) for k, v in outcome.outputs.items() if k != "stac"}
    step = None if plan.scene_gsd is None else plan.scene_gsd * scene.width / grid.cols
    maps = {"landuse": MapGrid((grid.rows, grid.cols), grid.map_transform(scene.ds.transform),
                               step),
            "confidence": MapGrid((grid.rows, grid.cols),
                                  grid.map_transform(scene.ds.transform), step)}
    if "hybrid" in files:
        with rasterio.open(files["hybrid"]) as ds:
            maps["hybrid"] = MapGrid((ds.height, ds.width), ds.transform, None)
    acq = Acquisition(datetime.fromisoformat(outcome.acquired.datetime.replace("Z", "+00:00")),
                      outcome.acquired.source)
    item_path = Path(outcome.outputs["stac"])
    properties: dict[str, Any] = {
        "terratile:model": outcome.model.model_dump(),
        "terratile:fractions": outcome.fractions, "terratile:areas_ha": outcome.areas_ha,
        "terratile:mean_confidence": outcome.mean_confidence,
        "terratile:input": outcome.input.model_dump(mode="json"),
        "terratile:warnings": outcome.warnings}
    if outcome.labels is not None:
        properties["terratile:labels"] = {n: v.model_dump() for n, v in outcome.labels.items()}
    if plan.scene_gsd is not None:
        properties["gsd"] = plan.scene_gsd
    item = build_item(ItemInputs(
        scene_id=outcome.scene_id, source=outcome.source, crs=scene.crs,
        bounds=outcome.bounds, scene_shape=(scene.height, scene.width),
        scene_transform=scene.ds.transform, geometry=footprint_wgs84(outcome.bounds, scene.crs),
        bbox=outcome.bounds_wgs84, acquisition=acq, classes=classes,
        nodata=NODATA, maps=maps, outputs=files, properties=properties,
    ), item_path, out_dir.parent / "catalog.json")
    write_json(item_path, item_dict(item))
    update_catalog(out_dir.parent, node_id, out_dir, outcome.source)


def _write_hybrid(path: Path, scene: Scene, grid: CellGrid, cmap: ClassMap,
                  settings: Settings) -> None:
    """GID's hybrid map on the overview grid (see appliance/segments.py)."""
    image = scene.overview_rescaled()
    seg = segment(image, scene.overview_valid, settings.tiling.segments,
                  settings.tiling.segment_scale)
    under = cell_labels_on(seg.shape, cmap.labels)
    hybrid = hybrid_map(seg, under, len(cmap.classes))
    h, w = seg.shape
    transform = scene.ds.transform @ rasterio.Affine.scale(scene.width / w, scene.height / h)
    write_landuse(path, hybrid, transform, cmap.crs, cmap.classes)


def _summary(outcome: SceneOutcome, runtime: SceneModel, fusion: str,
             grid: CellGrid) -> dict[str, Any]:
    """``summary.json``: what the scene contains, per class, and how it was computed."""
    manifest = runtime.manifest
    valid = outcome.cells.valid
    return {
        "schema": SUMMARY_SCHEMA,
        "scene_id": outcome.scene_id,
        "source": outcome.source,
        "model": outcome.model.model_dump(),
        "crs": outcome.crs,
        "bounds": list(outcome.bounds),
        "bounds_wgs84": list(outcome.bounds_wgs84),
        "width": outcome.width,
        "height": outcome.height,
        "grid": {"cell": grid.cell, "step": [grid.width / grid.cols, grid.height / grid.rows],
                 "rows": grid.rows, "cols": grid.cols,
                 "scales": list(grid.scales), "fusion": fusion},
        "cells": {"total": len(valid), "valid": int(valid.sum()),
                  "nodata": int((~valid).sum())},
        "classes": {name: {"fraction": outcome.fractions[name], "area_ha": outcome.areas_ha[name]}
                    for name in manifest.class_names},
        "area_ha_total": sum(outcome.areas_ha.values()),
        "mean_confidence": outcome.mean_confidence,
        "tiles": outcome.tiles,
        "input": outcome.input.model_dump(mode="json"),
        "acquired": outcome.acquired.model_dump(mode="json"),
        "warnings": outcome.warnings,
        "timings": outcome.timings,
        "outputs": {k: Path(v).name for k, v in outcome.outputs.items()},
        **({"labels": {n: s.model_dump() for n, s in outcome.labels.items()},
            "label_thresholds": outcome.label_thresholds} if outcome.labels is not None else {}),
    }
