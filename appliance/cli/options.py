"""What every ``terratile`` command group shares: the ``--config`` option, its loading,
how a configuration error is shown, and the daemon's lock on the state folder.

The config file is ``--config``, else ``$TERRATILE_CONFIG``, else
``/etc/terratile/appliance.yaml`` (where the systemd unit's install puts it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from appliance.config import EX_CONFIG, ConfigError, Settings, load_settings
from appliance.contract.durable import StateLock

DEFAULT_CONFIG = Path("/etc/terratile/appliance.yaml")
CONFIG_OPTION = typer.Option(
    None, "--config", "-c", envvar="TERRATILE_CONFIG", show_envvar=True, dir_okay=False,
    help=f"Appliance YAML config file (default: {DEFAULT_CONFIG}).")


def show_config_error(config: Path, exc: ConfigError) -> None:
    """Print every bad key of ``config``, one per line, on stderr."""
    typer.echo(f"{config}: invalid configuration", err=True)
    for line in str(exc).splitlines():
        typer.echo(f"  {line}", err=True)


def config_path(config: Path | None) -> Path:
    """The config file to read: ``config`` if given, else the default; exit with
    ``EX_CONFIG`` when there is none."""
    if config is not None:
        return config
    if not DEFAULT_CONFIG.is_file():
        typer.echo(f"no configuration: give --config FILE, set TERRATILE_CONFIG, or install "
                   f"{DEFAULT_CONFIG}", err=True)
        raise typer.Exit(EX_CONFIG)
    return DEFAULT_CONFIG


def settings_or_exit(config: Path | None, **overrides: Any) -> Settings:
    """Load ``config`` (or the default config, see ``config_path``) with ``overrides``; on
    error print every bad key and exit with ``EX_CONFIG``."""
    path = config_path(config)
    try:
        return load_settings(path, **overrides)
    except ConfigError as exc:
        show_config_error(path, exc)
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
