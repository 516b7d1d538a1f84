"""``terratile``: the edge CLI. Each command group lives in the module of its concept."""

from __future__ import annotations

from pathlib import Path

import typer

from appliance.cli import scene
from appliance.cli.checks import problems
from appliance.cli.fleet import fleet_app
from appliance.cli.index import index_app, query_command
from appliance.cli.models import models_app
from appliance.cli.options import DEFAULT_CONFIG, config_path, show_config_error
from appliance.config import ConfigError, load_settings
from appliance.telemetry import software_version

HELP = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__,
                  context_settings=HELP)
config_app = typer.Typer(no_args_is_help=True, help="Check configuration files.",
                         context_settings=HELP)
app.add_typer(config_app, name="config")


def _version(show: bool) -> None:
    if show:
        typer.echo(f"terratile {software_version()}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    """An edge appliance for tiled land-use inference on remote-sensing scenes."""


@config_app.command("validate")
def validate(
    file: Path | None = typer.Argument(
        None, envvar="TERRATILE_CONFIG", dir_okay=False,
        help=f"Config file [default: $TERRATILE_CONFIG, then {DEFAULT_CONFIG}]."),
    connect: bool = typer.Option(False, "--connect",
                                 help="Also connect to the broker with the credentials."),
) -> None:
    """Validate FILE: every key and value, then that its folders exist, the bundle loads and
    verifies (and with --connect the broker accepts the credentials). Exit 1 on any error."""
    path = config_path(file)
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        show_config_error(path, exc)
        raise typer.Exit(1) from exc
    found = problems(settings, connect)
    if found:
        typer.echo(f"{path}: does not work on this machine", err=True)
        for line in found:
            typer.echo(f"  {line}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{path}: OK")


scene.register(app)  # run, process, status
app.add_typer(models_app, name="models")  # list, rollback, activate, adapt
app.add_typer(index_app, name="index")  # add, stats
app.command("query")(query_command)
app.add_typer(fleet_app, name="fleet")  # status, query, install
