"""What the `bioengine` commands share: the consoles, the plugin manager, config loading."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from .errors import ConfigError, PluginError

console = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Path to site.toml.")]


@cache
def _manager() -> Any:
    from .plugins import PluginManager

    return PluginManager()


def plugins() -> Any:
    """The plugin manager, built once per process; exit 2 with the reason when it fails."""
    try:
        return _manager()
    except PluginError as exc:
        err.print(f"plugin error: {exc}", markup=False)
        raise typer.Exit(2) from None


def load(
    config: Path,
    overrides: dict[str, dict[str, Any]] | None = None,
    *,
    references: bool = False,
    preflight: bool = False,
    offline: bool = False,
) -> Any:
    """The validated site config; exit 2 listing every problem (file, section, key).

    With `references`, the environment variables and files the settings name must exist too
    (what `serve` needs before it starts anything); with `preflight`, each backend checks its
    endpoints and limits as well (only what needs no network when `offline`).
    """
    from .config import load_config
    from .preflight import run_preflight
    from .references import check_references

    try:
        cfg = load_config(config, plugins(), overrides=overrides)
    except ConfigError as exc:
        _problems("invalid configuration", exc.problems)
    problems = check_references(cfg) if references else []
    if preflight and not problems:  # endpoint checks need the credentials they name
        problems += run_preflight(cfg, offline=offline)
    if problems:
        _problems("the site is not ready", problems)
    return cfg


def _problems(title: str, problems: list[str]) -> None:
    err.print(f"[red]{title}[/red] ({len(problems)} problem(s)):", highlight=False)
    for problem in problems:
        err.print(f"  - {problem}", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(2)
