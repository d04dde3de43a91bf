"""What every ``terradapt`` command shares: the console, settings loading, the ``--config`` option."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console


@functools.cache
def _console() -> Console:
    """The rich console, created on first use (its width is read from the terminal or COLUMNS then)."""
    return Console()


def _settings(config: Path | None) -> object:
    from stream.config import ConfigError, load_settings

    try:
        return load_settings(config)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from exc


ConfigOption = Annotated[Path | None, typer.Option(help="TOML settings file (else TERRADAPT_CONFIG / env only)")]
