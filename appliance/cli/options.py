"""What every ``terratile`` command group shares: the ``--config`` option, its loading,
how a configuration error is shown, and the daemon's lock on the state folder."""

from __future__ import annotations

from pathlib import Path

import typer

from appliance.config import EX_CONFIG, ConfigError, Settings, load_settings
from appliance.contract.durable import StateLock

CONFIG_OPTION = typer.Option(..., "--config", "-c", help="Appliance YAML config file.",
                             dir_okay=False)


def show_config_error(config: Path, exc: ConfigError) -> None:
    """Print every bad key of ``config``, one per line, on stderr."""
    typer.echo(f"{config}: invalid configuration", err=True)
    for line in str(exc).splitlines():
        typer.echo(f"  {line}", err=True)


def settings_or_exit(config: Path) -> Settings:
    """Load ``config``; on error print every bad key and exit with ``EX_CONFIG``."""
    try:
        return load_settings(config)
    except ConfigError as exc:
        show_config_error(config, exc)
        raise typer.Exit(EX_CONFIG) from exc


def refuse_while_daemon_runs(settings: Settings, verb: str, payload: str = "{}") -> None:
    """Exit 1 when a daemon holds this state folder: changing its model store under it
    would change what it serves behind its back; it takes the same command over MQTT."""
    lock = StateLock(settings.paths.state)
    if lock.held_elsewhere():
        topic = f"{settings.mqtt.topic_prefix}/{settings.node_id}/cmd/{verb}"
        typer.echo(f"a terratile daemon is running on {settings.paths.state} "
                   f"(it holds {lock.path}): send the command to it instead, e.g. "
                   f"mosquitto_pub -t {topic} -m '{payload}'", err=True)
        raise typer.Exit(1)
