"""``terratile models``: list, roll back, activate and adapt the installed bundle versions.

These go through the same model host and adaptation job as the daemon (same fusion, same
gate, same switch), on this process. While a daemon runs on the same state folder they
refuse, naming the MQTT command that asks the daemon to do it: the daemon alone changes
what it serves.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from appliance.adapt.adapter import Adapter
from appliance.adapt.job import AdaptationJobs
from appliance.cli.options import CONFIG_OPTION, refuse_while_daemon_runs, settings_or_exit
from appliance.config import Settings
from appliance.contract.bundle import BundleError
from appliance.model.host import ModelHost
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
        experts = f"experts: {', '.join(v.experts)}  " if v.experts else ""
        typer.echo(f"{mark} v{v.version:<4} {v.name:<24} {parent:<12} {experts}{v.path}")


def _host(settings: Settings, verb: str, payload: str = "{}") -> ModelHost:
    """The node's model host without sessions, once no daemon holds the state."""
    refuse_while_daemon_runs(settings, verb, payload)
    try:
        return ModelHost.open(settings, serve=False)
    except (BundleError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc


def _switch(config: Path, version: int | None) -> None:
    settings = settings_or_exit(config)
    host = (_host(settings, "rollback") if version is None
            else _host(settings, "activate", json.dumps({"version": version})))
    before = host.bundle.version
    try:
        change = host.rollback() if version is None else host.activate(version)
    except BundleError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"active model: v{before} → v{change.bundle.version} ({change.bundle.path})")


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
    host = _host(settings, "adapt")
    adapter = Adapter(host.store, settings.adapt, settings.paths.state, settings.tiling)
    jobs = AdaptationJobs(adapter, host, settings.adapt.keep_versions, lambda _report: None)
    report = jobs.run_here("cli")
    typer.echo(report.model_dump_json(indent=2))
