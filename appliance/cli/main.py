"""``terratile``: the edge CLI. Each command group lives in the module of its concept."""

from __future__ import annotations

from pathlib import Path

import typer

from appliance.cli import scene
from appliance.cli.index import index_app, query_command
from appliance.cli.models import models_app
from appliance.cli.options import show_config_error
from appliance.config import ConfigError, load_settings

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
config_app = typer.Typer(no_args_is_help=True, help="Check configuration files.")
app.add_typer(config_app, name="config")


@config_app.command("validate")
def validate(file: Path) -> None:
    """Validate FILE; print every error with its key, exit 1 if there is any."""
    try:
        load_settings(file)
    except ConfigError as exc:
        show_config_error(file, exc)
        raise typer.Exit(1) from exc
    typer.echo(f"{file}: OK")


scene.register(app)  # run, process, status
app.add_typer(models_app, name="models")  # list, rollback, activate, adapt
app.add_typer(index_app, name="index")  # add, stats
app.command("query")(query_command)
