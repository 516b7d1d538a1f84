"""``terratile models``: list, install, roll back, activate and adapt the bundle versions.

These go through the same model host, installer and adaptation job as the daemon (same
verification, same compatibility check, same gate, same switch), on this process. While
a daemon runs on the same state folder they refuse, naming the MQTT command that asks the
daemon to do it: the daemon alone changes what it serves. ``install`` sends that command
itself (``cmd/install``) and prints the daemon's answer from ``events/model``.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer

from appliance.adapt.adapter import ADAPT_DIR, USAGE_FILE, Adapter
from appliance.adapt.job import AdaptationJobs
from appliance.adapt.usage import ExpertUsage
from appliance.cli.options import CONFIG_OPTION, refuse_while_daemon_runs, settings_or_exit
from appliance.config import Settings
from appliance.contract.bundle import BundleError
from appliance.contract.durable import StateLock
from appliance.model.host import ModelHost
from appliance.model.install import Installer, InstallRequest
from appliance.model.store import ModelStore
from appliance.retrieval.index import stored_dim

models_app = typer.Typer(no_args_is_help=True, help="Installed model versions.")


@models_app.command("list")
def list_versions(config: Path = CONFIG_OPTION,
                  as_json: bool = typer.Option(False, "--json", help="JSON array.")) -> None:
    """Every installed version with its path, parent, experts (with the scenes each served)
    and whether it is active."""
    settings = settings_or_exit(config)
    versions = ModelStore.for_settings(settings).versions()
    usage = ExpertUsage(settings.paths.state / ADAPT_DIR / USAGE_FILE,
                        settings.adapt.expert_idle_scenes).read().experts
    served = {name: u.scenes for name, u in usage.items()}
    if as_json:
        typer.echo(json.dumps([v.as_dict() | {"served": {
            name: served.get(name, 0) for name in ["source", *v.experts]}}
            for v in versions], indent=2))
        return
    if not versions:
        typer.echo("no model versions installed")
    for v in versions:
        mark = "*" if v.active else " "
        parent = f"parent v{v.parent}" if v.parent is not None else "source"
        experts = ("experts: " + ", ".join(f"{name} ({served.get(name, 0)} scenes)"
                                           for name in v.experts) + "  ") if v.experts else ""
        typer.echo(f"{mark} v{v.version:<4} {v.name:<24} {parent:<12} {experts}{v.path}")


def _host(settings: Settings, verb: str, payload: str = "{}") -> ModelHost:
    """The node's model host without sessions, once no daemon holds the state."""
    refuse_while_daemon_runs(settings, verb, payload)
    index_dim = stored_dim(settings.paths.state) if settings.retrieval.enabled else None
    try:
        return ModelHost.open(settings, serve=False, index_dim=index_dim)
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


@models_app.command("install")
def install(source: str = typer.Argument(..., help="Bundle directory, .tar[.gz] archive or "
                                         "http(s) URL of one."),
            sha256: str | None = typer.Option(None, "--sha256",
                                              help="Expected sha256 of its manifest.json."),
            activate_it: bool = typer.Option(False, "--activate", help="Run it once installed."),
            timeout: float = typer.Option(600.0, help="Seconds to wait for a running daemon."),
            config: Path = CONFIG_OPTION) -> None:
    """Verify SOURCE (every sha256, schema, fit to this box) and install it beside the other
    versions; with --activate run it. A running daemon is asked over MQTT (cmd/install)."""
    settings = settings_or_exit(config)
    if "://" not in source:
        source = str(Path(source).resolve())
    try:
        request = InstallRequest(source, sha256, activate_it).validated()
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if StateLock(settings.paths.state).held_elsewhere():
        _install_via_daemon(settings, request, timeout)
        return
    host = _host(settings, "install")
    before = host.bundle.version
    try:
        installed = Installer(host, settings.model, confined=False).install(request)
        if installed.staged is not None:
            host.switch(installed.staged, "install", source=request.source)
    except BundleError as exc:
        typer.echo(f"refused: {exc}", err=True)
        raise typer.Exit(1) from exc
    bundle = installed.bundle
    typer.echo(f"installed v{bundle.version} ({bundle.manifest.name}) at {bundle.path}")
    typer.echo(f"active model: v{before} → v{host.bundle.version}" if activate_it else
               f"active model: v{before} (activate with `terratile models activate "
               f"{bundle.version}`)")


def _install_via_daemon(settings: Settings, request: InstallRequest, timeout: float) -> None:
    """Send ``cmd/install`` to the daemon on this state folder; print its model event."""
    from appliance.cli.remote import command_and_wait

    payload = {"source": request.source, "sha256": request.sha256, "activate": request.activate}

    def answers(event: dict[str, object]) -> bool:
        return event.get("source") == request.source or (
            event.get("action") == "refused" and event.get("request") == "install")

    try:
        event = command_and_wait(settings, "install", payload, answers, timeout)
    except (OSError, TimeoutError) as exc:
        typer.echo(f"error: the daemon did not answer: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(json.dumps(event, indent=2))
    if event.get("action") == "refused":
        raise typer.Exit(1)


@models_app.command("adapt")
def adapt(config: Path = CONFIG_OPTION) -> None:
    """Run one gated adaptation job on the stored target cells now; print its report."""
    settings = settings_or_exit(config)
    host = _host(settings, "adapt")
    adapter = Adapter(host.store, settings.adapt, settings.paths.state, settings.tiling)
    jobs = AdaptationJobs(adapter, host, settings.adapt.keep_versions, lambda _report: None)
    report = jobs.run_here("cli")
    typer.echo(report.model_dump_json(indent=2))
