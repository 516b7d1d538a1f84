"""``terratile models``: list, roll back, activate and adapt the installed bundle versions.

The store is ``<paths.state>/models`` (see ``appliance.model.store``). Switching versions here
changes the active pointer on disk; a running daemon picks it up on ``cmd/reload`` (or use
``cmd/rollback`` over MQTT, which also swaps the head in the running process).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from appliance.adapt.adapter import Adapter
from appliance.cli.options import CONFIG_OPTION, settings_or_exit
from appliance.contract.bundle import BundleError
from appliance.model.store import ModelStore

models_app = typer.Typer(no_args_is_help=True, help="Installed model versions.")


@models_app.command("list")
def list_versions(config: Path = CONFIG_OPTION,
                  as_json: bool = typer.Option(False, "--json", help="JSON array.")) -> None:
    """Every installed version with its path, parent, experts and whether it is active."""
    versions = ModelStore.for_settings(settings_or_exit(config)).versions()
    if as_json:
        typer.echo(json.dumps([v.as_dict() for v in versions], indent=2))
        return
    if not versions:
        typer.echo("no model versions installed")
    for v in versions:
        mark = "*" if v.active else " "
        parent = f"parent v{v.parent}" if v.parent is not None else "source"
        experts = f"experts: {', '.join(v.domains)}  " if v.domains else ""
        typer.echo(f"{mark} v{v.version:<4} {v.name:<24} {parent:<12} {experts}{v.path}")


def _switch(config: Path, version: int | None) -> None:
    store = ModelStore.for_settings(settings_or_exit(config))
    before = store.active_version()
    try:
        bundle = store.rollback() if version is None else store.activate(version)
    except BundleError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"active model: v{before} → v{bundle.version} ({bundle.path})")


@models_app.command("rollback")
def rollback(config: Path = CONFIG_OPTION) -> None:
    """Activate the parent of the active version."""
    _switch(config, None)


@models_app.command("activate")
def activate(version: int = typer.Argument(..., help="Installed version number."),
             config: Path = CONFIG_OPTION) -> None:
    """Activate an installed VERSION (verified first)."""
    _switch(config, version)


@models_app.command("adapt")
def adapt(config: Path = CONFIG_OPTION) -> None:
    """Run one gated adaptation job on the stored target cells now; print its report."""
    settings = settings_or_exit(config)
    store = ModelStore.for_settings(settings)
    adapter = Adapter(store, settings.adapt, settings.paths.state, settings.tiling)
    try:
        report = adapter.run(store.active(), "cli")
        if report.promoted and report.candidate is not None:  # interim: ModelHost's job
            bundle = store.install(Path(report.candidate), activate=True)
            store.prune(settings.adapt.keep_versions)
            report = report.model_copy(update={"version_after": bundle.version,
                                               "bundle_path": str(bundle.path)})
        elif report.action == "reset" and report.reset_to is not None:
            bundle = store.activate(report.reset_to)
            report = report.model_copy(update={"version_after": bundle.version,
                                               "bundle_path": str(bundle.path)})
    except BundleError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps(report.as_dict(), indent=2))
