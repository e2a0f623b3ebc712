"""What every ``mailhop`` subcommand shares: the --config option and loading the file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ..config import load_config
from ..config.schema import Config
from ..errors import ConfigError

__all__ = ["DEFAULT_CONFIG", "config_option", "read_config"]

DEFAULT_CONFIG = os.environ.get("MAILHOP_CONFIG", "/etc/mailhop/mailhop.toml")
config_option = click.option(
    "--config",
    "-c",
    "config_path",
    default=DEFAULT_CONFIG,
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Configuration file (TOML). Also $MAILHOP_CONFIG.",
)


def read_config(path: Path) -> Config:
    """Load the config or exit 78 (EX_CONFIG) with every problem on stderr."""
    try:
        return load_config(path)
    except ConfigError as exc:
        click.echo(f"mailhop: configuration error\n{exc.detail}", err=True)
        sys.exit(78)
