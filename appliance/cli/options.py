"""What every ``terratile`` command group shares: the ``--config`` option and its loading."""

from __future__ import annotations

from pathlib import Path

import typer

from appliance.config import ConfigError, Settings, load_settings

EX_CONFIG = 78  # sysexits.h: the unit file does not restart on a configuration error

CONFIG_OPTION = typer.Option(..., "--config", "-c", help="Appliance YAML config file.",
                             dir_okay=False)


def settings_or_exit(config: Path) -> Settings:
    """Load ``config``; on error print every bad key and exit with ``EX_CONFIG``."""
    try:
        return load_settings(config)
    except ConfigError as exc:
        typer.echo(f"{config}: invalid configuration\n{exc}", err=True)
        raise typer.Exit(EX_CONFIG) from exc
