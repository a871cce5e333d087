"""`bioengine slurm ...`: preview the batch script a replica job is submitted with."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bioengine_core.contracts import ReplicaSpec
from bioengine_core.errors import BioEngineError, ConfigError

from .executor import SlurmExecutor
from .script import default_template_text

slurm_app = typer.Typer(help="SLURM executor: preview batch scripts.", no_args_is_help=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


def build_spec_and_executor(config: Path, models: list[str]) -> tuple[SlurmExecutor, ReplicaSpec]:
    """The executor and the replica spec `bioengine serve --config` would use."""
    from bioengine_core.config import load_config

    cfg = load_config(config)
    if cfg.executor.record.name != "slurm":
        raise ConfigError(
            f"{config}: [executor] kind = {cfg.executor.record.name!r}; "
            '`bioengine slurm` needs kind = "slurm"'
        )
    context = cfg.context()
    executor = SlurmExecutor(cfg.executor.settings, context)
    storage = cfg.storage.record.factory(settings=cfg.storage.settings, context=context)
    names = models or sorted(m.id for m in cfg.models if m.id)
    unnamed = [m.source for m in cfg.models if not m.id]
    if unnamed and not models:
        typer.echo(
            "note: models without an `id` in the config get their id from the package when "
            f"`serve` resolves them ({', '.join(unnamed)}); pass --model ID to show them",
            err=True,
        )
    spec = cfg.replica_spec(storage.location(), names)
    return executor, spec


@slurm_app.command("script")
def script(
    config: Annotated[Path, typer.Option("--config", "-c", help="Path to site.toml.")],
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="Triton model names to load (default: config ids)."),
    ] = None,
) -> None:
    """Print exactly the batch script a replica job is submitted with."""
    try:
        executor, spec = build_spec_and_executor(config, list(model or []))
        text = executor.preview(spec)
        executor.paths.ensure()  # the output directory must exist when the job starts
    except ConfigError as exc:
        raise _fail("invalid configuration:\n  - " + "\n  - ".join(exc.problems)) from None
    except BioEngineError as exc:
        raise _fail(str(exc), 1) from None
    typer.echo(text, nl=False)


@slurm_app.command("template")
def template() -> None:
    """Print the default batch-script template (copy it, then set [executor] template)."""
    typer.echo(default_template_text(), nl=False)
