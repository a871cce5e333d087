"""`bioengine slurm ...`: preview the batch script a replica job is submitted with."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bioengine_core.contracts import ReplicaSpec
from bioengine_core.errors import BioEngineError, ConfigError
from bioengine_core.site import load_site

from .executor import SlurmExecutor
from .script import default_template_text

slurm_app = typer.Typer(help="SLURM executor: preview batch scripts.", no_args_is_help=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


def build_spec_and_executor(config: Path, models: list[str]) -> tuple[SlurmExecutor, ReplicaSpec]:
    """The executor and the replica spec `bioengine serve --config` would use."""
    site = load_site(config, executor_kind="slurm")
    executor: SlurmExecutor = site.executor  # type: ignore[assignment]
    if site.unnamed_models and not models:
        typer.echo(
            "note: models without an `id` in the config get their id from the package when "
            f"`serve` resolves them ({', '.join(site.unnamed_models)}); pass --model ID to show "
            "them",
            err=True,
        )
    return executor, site.spec(models or site.configured_model_ids)


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
