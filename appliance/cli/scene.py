"""``terratile run | process | status``: the daemon, one scene by hand, and a status look."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from appliance.cli.options import CONFIG_OPTION, settings_or_exit
from appliance.config import EX_CONFIG, Settings
from appliance.contract.bundle import BundleError


def _logging(settings: Settings) -> None:
    from appliance.logs import setup_logging

    setup_logging(settings)


def run(config: Path = CONFIG_OPTION) -> None:
    """Run the daemon: watch the inbox, process scenes, publish on MQTT, until SIGTERM."""
    from appliance.app import run_daemon

    settings = settings_or_exit(config)
    _logging(settings)
    raise typer.Exit(run_daemon(settings, config))


def process(scene: Path, config: Path = CONFIG_OPTION) -> None:
    """Process one SCENE (no inbox, no journal, no MQTT) and print the result JSON."""
    from appliance.contract.bundle import sha256_file
    from appliance.model.host import ModelHost
    from appliance.scene.pipeline import SceneError, process_scene

    settings = settings_or_exit(config)
    _logging(settings)
    if not scene.is_file():
        typer.echo(f"{scene}: no such file", err=True)
        raise typer.Exit(2)
    try:
        host = ModelHost.open(settings)
    except (BundleError, FileNotFoundError) as exc:
        typer.echo(f"cannot load the model: {exc}", err=True)
        raise typer.Exit(EX_CONFIG) from exc
    scene_id = sha256_file(scene)
    try:
        outcome = process_scene(scene, scene_id, settings.paths.results / scene_id,
                                host.runtime, settings, probe_sharpness=settings.adapt.enabled,
                                embedding_scale=settings.retrieval.scale)
    except SceneError as exc:
        typer.echo(f"{scene}: {exc.reason}: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(outcome.result(settings.node_id, None).model_dump_json(by_alias=True, indent=2))


def status(config: Path = CONFIG_OPTION) -> None:
    """Print the journal's view as JSON: queue depth, active model, scene counts, outbox,
    and the running daemon's own last status (its MQTT connection, what is degraded)."""
    from appliance.contract.durable import StateLock
    from appliance.ingest.inbox import Inbox
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
        inbox = Inbox(paths.inbox, paths.work_dir, settings.input.settle_seconds,
                      settings.input.rescan_seconds)
        inbox.rescan()
        out = {"node_id": settings.node_id, "queue_depth": inbox.depth(),
               "inbox": inbox.waiting(), "work": inbox.in_work(), "model": model,
               "scenes": journal.counts(), "outbox_depth": journal.outbox_depth(),
               "daemon": _daemon_status(paths.state, StateLock(paths.state).held_elsewhere())}
    finally:
        journal.close()
    typer.echo(json.dumps(out, indent=2, default=str))
    daemon = out["daemon"]
    if isinstance(daemon, dict) and daemon.get("degraded"):
        typer.echo(f"WARNING: the daemon is degraded: {', '.join(daemon['degraded'])}", err=True)


def _daemon_status(state: Path, running: bool) -> dict[str, object] | None:
    """The status the running daemon last wrote (None: no daemon runs on ``state``)."""
    from appliance.telemetry import STATUS_FILE

    if not running:
        return None
    try:
        loaded = json.loads((state / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {"state": "unknown"}
    return loaded if isinstance(loaded, dict) else {"state": "unknown"}


def register(app: typer.Typer) -> None:
    """Add the three commands to the ``terratile`` root."""
    app.command("run")(run)
    app.command("process")(process)
    app.command("status")(status)
