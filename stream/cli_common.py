"""What every ``terradapt`` command shares: the console, settings loading, the ``--config`` option."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from terradapt.capture_time import CaptureTimes


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


def capture_times(
    when: str | None,
    table: Path | None,
    flair: Path | None,
    campaign_start: str | None,
    campaign_end: str | None,
    *,
    require: bool = False,
) -> CaptureTimes:
    """The capture-time sources of ``terradapt ingest`` from its options (``require``: refuse undated files)."""
    from terradapt.capture_time import CaptureTimes, csv_times, flair_metadata_times, parse_datetime

    try:
        times = CaptureTimes(
            fixed=parse_datetime(when, "--datetime") if when else None,
            table=csv_times(table) if table else {},
            flair=flair_metadata_times(flair) if flair else {},
            campaign_start=parse_datetime(campaign_start, "--campaign-start") if campaign_start else None,
            campaign_end=parse_datetime(campaign_end, "--campaign-end") if campaign_end else None,
            require=require,
        )
    except (OSError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from exc
    if times.campaign_start and times.campaign_end and times.campaign_start > times.campaign_end:
        raise typer.BadParameter(f"--campaign-start {campaign_start} is after --campaign-end {campaign_end}")
    return times
