"""``terratile index add|stats`` and ``terratile query``: the retrieval index from a shell.

``index add DIR`` indexes a folder of reference images (JPEG/PNG, GeoTIFF chips) as entries
of their own: ``scene_id = "ref:<sha256 of the file>"`` (re-adding a file replaces its entry),
``source`` = the path relative to DIR, ``label`` = the parent folder's name, and ``class`` =
that name when it is one of the model's classes (case-insensitive), the predicted class
otherwise. Unreadable files are reported and skipped; the rest are indexed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import typer

from appliance.cli.options import CONFIG_OPTION, settings_or_exit
from appliance.config import Settings
from appliance.contract.bundle import Bundle, BundleError, load_bundle, sha256_file
from appliance.contract.image_files import is_image
from appliance.model.runtime import ModelRuntime, open_runtime
from appliance.model.store import ModelStore
from appliance.retrieval.index import Entry, IndexStateError, TileIndex
from appliance.retrieval.service import (
    RESPONSE_SCHEMA,
    RequestError,
    RetrievalService,
    embed_images,
    load_image,
)

index_app = typer.Typer(no_args_is_help=True, help="The local retrieval index.")
BATCH = 32


def active_bundle(settings: Settings) -> Bundle:
    """The model store's active bundle, else ``model.bundle`` from the config."""
    store = ModelStore.for_settings(settings)
    if store.active_version() is not None:
        return store.active()
    if settings.model.bundle is None:
        raise BundleError("no active model in the store and no model.bundle in the config")
    return load_bundle(settings.model.bundle)


def active_runtime(settings: Settings) -> ModelRuntime:
    """A runtime for the active bundle on the configured providers."""
    return open_runtime(active_bundle(settings), settings)


def open_index(settings: Settings, dim: int | None = None, read_only: bool = False) -> TileIndex:
    """The index under ``paths.state``; ``dim`` defaults to the active bundle's embedding."""
    if dim is None:
        dim = active_bundle(settings).manifest.embedding_dim
    return TileIndex(settings.paths.state, settings.retrieval, dim, read_only=read_only)


def _images(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*")):
        if path.is_file() and is_image(path):
            yield path


def add_reference_images(root: Path, index: TileIndex, runtime: ModelRuntime,
                         bands: list[int] | None = None) -> tuple[int, list[str]]:
    """Index every image under ``root``; returns (entries added, one line per skipped file)."""
    names = runtime.manifest.class_names
    by_lower = {n.lower(): n for n in names}
    added, skipped, seen = 0, [], set()
    batch: list[tuple[Path, str, np.ndarray]] = []

    def flush() -> int:
        if not batch:
            return 0
        emb, probs = embed_images(np.stack([t for _, _, t in batch]), runtime)
        entries = []
        for (path, sid, _), p in zip(batch, probs, strict=True):
            folder = path.parent.name if path.parent != root else None
            predicted = names[int(p.argmax())]
            entries.append(Entry(
                scene_id=sid, source=str(path.relative_to(root)), label=folder,
                class_name=by_lower.get(folder.lower(), predicted) if folder else predicted,
                confidence=float(p.max()),
            ))
        n = index.replace([e.scene_id for e in entries], entries, emb)
        batch.clear()
        return n

    for path in _images(root):
        try:
            sid = "ref:" + sha256_file(path)
        except OSError as exc:
            skipped.append(f"{path}: unreadable: {exc}")
            continue
        if sid in seen:
            skipped.append(f"{path}: duplicate of a file already added in this run")
            continue
        seen.add(sid)
        try:
            batch.append((path, sid, load_image(path, runtime, bands)))
        except RequestError as exc:
            skipped.append(exc.message)
            continue
        if len(batch) >= BATCH:
            added += flush()
    added += flush()
    return added, skipped


@index_app.command("add")
def add(directory: Path = typer.Argument(..., exists=True, file_okay=False),
        config: Path = CONFIG_OPTION) -> None:
    """Index the reference images under DIRECTORY (label = parent folder name)."""
    settings = settings_or_exit(config)
    try:
        runtime = active_runtime(settings)
        index = open_index(settings, runtime.manifest.embedding_dim)
    except (BundleError, IndexStateError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    try:
        added, skipped = add_reference_images(directory, index, runtime, settings.input.bands)
    finally:
        index.close()
    for line in skipped:
        typer.echo(f"skipped: {line}", err=True)
    typer.echo(f"indexed {added} reference images from {directory} ({len(skipped)} skipped)")


@index_app.command("stats")
def stats(config: Path = CONFIG_OPTION,
          as_json: bool = typer.Option(False, "--json", help="One JSON object.")) -> None:
    """Counts, index type, dimensions, size on disk and the last recall check."""
    settings = settings_or_exit(config)
    try:
        index = open_index(settings, read_only=True)
    except (BundleError, IndexStateError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    try:
        info = index.stats()
    finally:
        index.close()
    if as_json:
        typer.echo(json.dumps(info))
        return
    for key, value in info.items():
        typer.echo(f"{key:>17}: {json.dumps(value) if isinstance(value, dict) else value}")


def _read_vector(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path).astype(np.float32).ravel()
    text = path.read_text().strip()
    values = json.loads(text) if text.startswith("[") else text.replace(",", " ").split()
    return np.asarray(values, np.float32).ravel()


def query_command(
    config: Path = CONFIG_OPTION,
    image: Path | None = typer.Option(None, "--image", help="Query by an image file."),
    scene: str | None = typer.Option(None, "--scene", help="Query by a cell of this scene."),
    pixel: tuple[float, float] | None = typer.Option(None, "--pixel", help="COL ROW"),
    lonlat: tuple[float, float] | None = typer.Option(None, "--lonlat", help="LON LAT"),
    vector_file: Path | None = typer.Option(None, "--vector-file",
                                            help=".npy, JSON list or whitespace numbers"),
    k: int = typer.Option(20, "-k", "--k", help="Number of results."),
    class_name: str | None = typer.Option(None, "--class", help="Only this class."),
    scene_filter: str | None = typer.Option(None, "--scene-filter", help="Only this scene."),
    since: str | None = typer.Option(None, "--since", help="Indexed at or after (ISO 8601)."),
    until: str | None = typer.Option(None, "--until", help="Indexed at or before (ISO 8601)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Nearest indexed cells / reference images to an image, a cell or a vector."""
    settings = settings_or_exit(config)
    runtime: ModelRuntime | None = None
    try:
        if image is not None:
            runtime = active_runtime(settings)
        index = open_index(settings, runtime.manifest.embedding_dim if runtime else None,
                           read_only=True)
    except (BundleError, IndexStateError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    service = RetrievalService(index, settings.retrieval, lambda: runtime, settings.node_id,
                               settings.input.bands)
    reply: dict[str, Any] = {"schema": RESPONSE_SCHEMA, "node_id": settings.node_id}
    try:
        query = service.parse({
            "image": str(image) if image else None, "scene_id": scene,
            "pixel": list(pixel) if pixel else None, "lonlat": list(lonlat) if lonlat else None,
            "vector": _read_vector(vector_file).tolist() if vector_file else None, "k": k,
            "filters": {"class": class_name, "scene_id": scene_filter,
                        "since": since, "until": until},
        })
        reply["query"] = query.describe()
        reply["results"] = [h.as_dict() for h in service.run(query)]
    except RequestError as exc:
        reply["error"] = {"code": exc.code, "message": exc.message}
    except (OSError, ValueError) as exc:
        reply["error"] = {"code": "bad-request", "message": str(exc)}
    finally:
        index.close()
    _print(reply, as_json)
    if "error" in reply:
        raise typer.Exit(1)


def _print(reply: dict[str, Any], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(reply))
        return
    if "error" in reply:
        typer.echo(f"error ({reply['error']['code']}): {reply['error']['message']}", err=True)
        return
    for rank, hit in enumerate(reply["results"], 1):
        where = hit["window"] if hit["window"] else ""
        typer.echo(f"{rank:3d}  {hit['score']:.4f}  {hit['class'] or '-':<20} "
                   f"{hit['source']}  {where}")

