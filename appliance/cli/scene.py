"""``terratile run | process | status``: the daemon, one scene by hand, and a status look."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import typer

from appliance.cli.options import CONFIG_OPTION, settings_or_exit
from appliance.config import Settings
from appliance.contract.bundle import BundleError


def _logging(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run(config: Path = CONFIG_OPTION) -> None:
    """Run the daemon: watch the inbox, process scenes, publish on MQTT, until SIGTERM."""
    from appliance.app import run_daemon

    settings = settings_or_exit(config)
    _logging(settings)
    raise typer.Exit(run_daemon(settings))


def process(scene: Path, config: Path = CONFIG_OPTION) -> None:
    """Process one SCENE (no inbox, no journal, no MQTT) and print the result JSON."""
    from appliance.app import build_result
    from appliance.contract.bundle import sha256_file
    from appliance.model.runtime import open_runtime
    from appliance.model.store import open_store
    from appliance.scene.pipeline import SceneError, process_scene

    settings = settings_or_exit(config)
    _logging(settings)
    if not scene.is_file():
        typer.echo(f"{scene}: no such file", err=True)
        raise typer.Exit(2)
    try:
        bundle = open_store(settings).active()
        runtime = open_runtime(bundle, settings)
    except (BundleError, FileNotFoundError) as exc:
        typer.echo(f"cannot load the model: {exc}", err=True)
        raise typer.Exit(78) from exc
    scene_id = sha256_file(scene)
    try:
        outcome = process_scene(scene, scene_id, settings.paths.outbox / scene_id, runtime,
                                settings, probe_sharpness=settings.adapt.enabled,
                                embedding_scale=settings.retrieval.scale)
    except SceneError as exc:
        typer.echo(f"{scene}: {exc.reason}: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(build_result(outcome, bundle, settings.node_id, None).model_dump_json(
        by_alias=True, indent=2))


def status(config: Path = CONFIG_OPTION) -> None:
    """Print the journal's view as JSON: queue depth, active model, scene counts, outbox."""
    from appliance.ingest.inbox import ignored
    from appliance.ingest.journal import Journal
    from appliance.model.store import ModelStore

    settings = settings_or_exit(config)
    paths = settings.paths
    db = paths.state / "journal.sqlite"
    if not db.is_file():
        typer.echo(f"no journal at {db}: the daemon has not run with this config", err=True)
        raise typer.Exit(1)
    journal = Journal(db)
    try:
        store = ModelStore.for_settings(settings)
        active = store.active_version()
        model = next((v.as_dict() for v in store.versions() if v.version == active), None)
        queued = [p for p in paths.inbox.iterdir() if p.is_file() and not ignored(p.name)] \
            if paths.inbox.is_dir() else []
        work = list(paths.work_dir.iterdir()) if paths.work_dir.is_dir() else []
        out = {"node_id": settings.node_id, "queue_depth": len(queued) + len(work),
               "inbox": len(queued), "work": len(work), "model": model,
               "scenes": journal.counts(), "outbox_depth": journal.outbox_depth()}
    finally:
        journal.close()
    typer.echo(json.dumps(out, indent=2, default=str))


def register(app: typer.Typer) -> None:
    """Add the three commands to the ``terratile`` root."""
    app.command("run")(run)
    app.command("process")(process)
    app.command("status")(status)
