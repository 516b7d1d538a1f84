"""``terratile run | process | status``: the daemon, one scene by hand, and a status look."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from appliance.cli.options import CONFIG_OPTION, settings_or_exit
from appliance.config import EX_CONFIG, Settings
from appliance.contract.bundle import BundleError


def _logging(settings: Settings, level: str | None = None) -> None:
    from appliance.logs import setup_logging

    setup_logging(settings, level=level)


def run(config: Path = CONFIG_OPTION) -> None:
    """Run the daemon: watch the inbox, process scenes, publish on MQTT, until SIGTERM."""
    from appliance.app import run_daemon

    settings = settings_or_exit(config)
    _logging(settings)
    raise typer.Exit(run_daemon(settings, config))


def parse_bands(text: str) -> list[int | str]:
    """``3,2,1`` or ``red,green,blue`` (or a mix) → input.bands."""
    items = [t.strip() for t in text.split(",") if t.strip()]
    return [int(t) if t.isdigit() else t for t in items]


def process(
    scenes: list[Path] = typer.Argument(..., help="Scene files (GeoTIFF)."),
    config: Path = CONFIG_OPTION,
    out: Path | None = typer.Option(
        None, "--out", "-o", file_okay=False,
        help="Write each scene's outputs under OUT/<scene_id>/ [default: paths.results]."),
    bundle: Path | None = typer.Option(
        None, "--bundle", exists=True, file_okay=False,
        help="Run this bundle (verified, not installed) instead of the node's model."),
    bands: str | None = typer.Option(
        None, "--bands", help="input.bands for these scenes: numbers or names, e.g. 3,2,1 "
        "or red,green,blue."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress (INFO)."),
) -> None:
    """Process SCENES (no inbox, no journal, no MQTT) and print the result JSON on stdout:
    one object for one scene, an array for several. Logs and progress go to stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from appliance.contract.bundle import load_bundle, sha256_file
    from appliance.model.host import ModelHost
    from appliance.model.runtime import ModelRuntime, ProviderPlan
    from appliance.scene.pipeline import SceneError, SceneOutcome, process_scene

    overrides = {"input": {"bands": parse_bands(bands)}} if bands else {}
    settings = settings_or_exit(config, **overrides)
    _logging(settings, None if verbose else "WARNING")
    missing = [s for s in scenes if not s.is_file()]
    if missing:
        typer.echo(f"{missing[0]}: no such file", err=True)
        raise typer.Exit(2)
    try:
        runtime = (ModelRuntime(load_bundle(bundle), ProviderPlan.from_settings(settings),
                                settings.model.tta)
                   if bundle is not None else ModelHost.open(settings).runtime)
    except (BundleError, FileNotFoundError) as exc:
        typer.echo(f"cannot load the model: {exc}", err=True)
        raise typer.Exit(EX_CONFIG) from exc
    results_dir = out or settings.paths.results
    done: list[SceneOutcome] = []
    failed = 0
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task("scenes", total=len(scenes))
        for scene in scenes:
            bar.update(task, description=scene.name)
            scene_id = sha256_file(scene)
            try:
                done.append(process_scene(
                    scene, scene_id, results_dir / scene_id, runtime, settings,
                    probe_sharpness=settings.adapt.enabled,
                    embedding_scale=settings.retrieval.scale))
            except SceneError as exc:
                failed += 1
                typer.echo(f"{scene}: {exc.reason}: {exc.message}", err=True)
            bar.advance(task)
    for outcome in done:
        for warning in outcome.warnings:
            typer.echo(f"warning: {warning}", err=True)
    payloads = [json.loads(o.result(settings.node_id, None).to_json()) for o in done]
    if len(scenes) == 1 and payloads:
        typer.echo(json.dumps(payloads[0], indent=2))
    elif len(scenes) > 1:
        typer.echo(json.dumps(payloads, indent=2))
    if failed:
        raise typer.Exit(1)


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
