"""``terratile index add|stats`` and ``terratile query``: the retrieval index from a shell.

``index add DIR`` indexes a folder of reference images (``appliance.retrieval.references``).
``query`` answers through the daemon's own ``RetrievalService`` and prints its reply
envelope; it reads the index read-only and is not limited to ``retrieval.allowed_dirs``.
The model is the store's active bundle, else ``model.bundle``; nothing is installed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from appliance.cli.options import CONFIG_OPTION, settings_or_exit
from appliance.config import Settings
from appliance.contract.bundle import BundleError
from appliance.ingest.journal import Journal
from appliance.model.runtime import ModelRuntime, open_runtime
from appliance.model.store import serving_bundle
from appliance.retrieval.entry_log import IndexStateError
from appliance.retrieval.index import TileIndex
from appliance.retrieval.query import Reply, RequestError
from appliance.retrieval.references import add_reference_images, reference_files
from appliance.retrieval.service import RetrievalService

index_app = typer.Typer(no_args_is_help=True, help="The local retrieval index.")


def open_index(settings: Settings, dim: int | None = None, read_only: bool = False) -> TileIndex:
    """The index under ``paths.state``; ``dim`` defaults to the active bundle's embedding."""
    if dim is None:
        dim = serving_bundle(settings).manifest.embedding_dim
    return TileIndex(settings.paths.state, settings.retrieval, dim, read_only=read_only)


@index_app.command("add")
def add(directory: Path = typer.Argument(..., exists=True, file_okay=False),
        config: Path = CONFIG_OPTION) -> None:
    """Index the reference images under DIRECTORY (label = parent folder name)."""
    settings = settings_or_exit(config)
    try:
        runtime = open_runtime(serving_bundle(settings), settings)
        index = open_index(settings, runtime.manifest.embedding_dim)
    except (BundleError, IndexStateError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    total = sum(1 for _ in reference_files(directory))
    console = Console(stderr=True)
    try:
        with Progress(TextColumn("indexing"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.description}"), console=console, transient=True,
                      disable=not console.is_terminal) as bar:
            task = bar.add_task("", total=total)
            added, skipped = add_reference_images(
                directory, index, runtime, settings.input,
                lambda path: bar.update(task, advance=1, description=path.name))
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


def read_vector(path: Path) -> np.ndarray:
    """A query vector from ``path``: ``.npy``, a JSON list or whitespace/comma numbers."""
    if path.suffix == ".npy":
        return np.load(path).astype(np.float32).ravel()
    text = path.read_text().strip()
    values = json.loads(text) if text.startswith("[") else text.replace(",", " ").split()
    return np.asarray(values, np.float32).ravel()


IMAGE_OPTION = typer.Option(None, "--image", help="Query by an image file.")
PIXEL_OPTION = typer.Option(None, "--pixel", help="COL ROW")
LONLAT_OPTION = typer.Option(None, "--lonlat", help="LON LAT")
VECTOR_OPTION = typer.Option(None, "--vector-file", help=".npy, JSON list or whitespace numbers")
K_OPTION = typer.Option(20, "-k", "--k", help="Number of results.")
CLASS_OPTION = typer.Option(None, "--class", help="Only this class.")
SCENE_FILTER_OPTION = typer.Option(None, "--scene-filter", help="Only this scene.")
SINCE_OPTION = typer.Option(None, "--since", help="Indexed at or after (ISO 8601).")
UNTIL_OPTION = typer.Option(None, "--until", help="Indexed at or before (ISO 8601).")
LABEL_OPTION = typer.Option(None, "--label", help="Multi-label bundles: only cells holding "
                            "this label (repeat: all of them).")


def query_request(image: Path | None, scene: str | None, pixel: tuple[float, float] | None,
                  lonlat: tuple[float, float] | None, vector: list[float] | None, k: int,
                  class_name: str | None, scene_filter: str | None, since: str | None,
                  until: str | None, labels: list[str]) -> dict[str, Any]:
    """The retrieval request object the query options make (``terratile query`` answers
    it locally, ``terratile fleet query`` sends it to every node)."""
    return {
        "image": str(image) if image else None, "scene_id": scene,
        "pixel": list(pixel) if pixel else None, "lonlat": list(lonlat) if lonlat else None,
        "vector": vector, "k": k,
        "filters": {"class": class_name, "scene_id": scene_filter,
                    "since": since, "until": until, "labels": labels},
    }


def query_command(
    config: Path = CONFIG_OPTION,
    image: Path | None = IMAGE_OPTION,
    scene: str | None = typer.Option(
        None, "--scene", help="Query by a cell of this scene: its id, a unique id prefix or "
        "its file name."),
    pixel: tuple[float, float] | None = PIXEL_OPTION,
    lonlat: tuple[float, float] | None = LONLAT_OPTION,
    vector_file: Path | None = VECTOR_OPTION,
    k: int = K_OPTION,
    class_name: str | None = CLASS_OPTION,
    scene_filter: str | None = SCENE_FILTER_OPTION,
    since: str | None = SINCE_OPTION,
    until: str | None = UNTIL_OPTION,
    label: list[str] | None = LABEL_OPTION,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Nearest indexed cells / reference images to an image, a cell or a vector."""
    settings = settings_or_exit(config)
    runtime: ModelRuntime | None = None
    try:
        scene, scene_filter = resolve_scene(settings, scene), resolve_scene(settings, scene_filter)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    try:
        if image is not None:
            runtime = open_runtime(serving_bundle(settings), settings)
        index = open_index(settings, runtime.manifest.embedding_dim if runtime else None,
                           read_only=True)
    except (BundleError, IndexStateError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    service = RetrievalService(index, settings.retrieval, lambda: runtime, settings.node_id,
                               settings.input)
    try:
        vector = read_vector(vector_file).tolist() if vector_file else None
    except (OSError, ValueError) as exc:
        reply = service.refuse(RequestError("bad-request", f"{vector_file}: {exc}"))
    else:
        reply = service.answer(query_request(image, scene, pixel, lonlat, vector, k,
                                             class_name, scene_filter, since, until,
                                             label or []))
    finally:
        index.close()
    _print(reply, as_json)
    if reply.error is not None:
        raise typer.Exit(1)


def resolve_scene(settings: Settings, given: str | None) -> str | None:
    """The scene id ``given`` names: a full id, a unique prefix of one, or the file name it
    was dropped as (among the scenes the daemon's journal lists as done). Anything else
    is passed on as it is (the query then answers ``unknown-scene``)."""
    db = settings.paths.state / "journal.sqlite"
    if given is None or re.fullmatch(r"[0-9a-f]{64}", given) or not db.is_file():
        return given
    journal = Journal(db)
    try:
        done = journal.scenes("done")
    finally:
        journal.close()
    matches = sorted({r.scene_id for r in done if r.scene_id.startswith(given)
                      or r.source == given or Path(r.source).name == given})
    if len(matches) > 1:
        raise ValueError(f"{given!r} matches {len(matches)} scenes "
                         f"({', '.join(m[:12] for m in matches[:5])}…): give more of the id")
    return matches[0] if matches else given


def _print(reply: Reply, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(reply.as_dict()))
        return
    if reply.error is not None:
        typer.echo(f"error ({reply.error.code}): {reply.error.message}", err=True)
        return
    for rank, hit in enumerate(reply.hits, 1):
        e = hit.entry
        where = list(e.window) if e.window else ""
        typer.echo(f"{rank:3d}  {hit.score:.4f}  {e.class_name or '-':<20} "
                   f"{e.source}  {where}")
