"""`bioengine slurm ...`: preview the batch script a replica job is submitted with."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bioengine_core.contracts import ReplicaSpec
from bioengine_core.errors import BioEngineError, ConfigError, ExecutorError
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
            "note: serve also loads models whose [[models]] entry has no `id` "
            f"({', '.join(site.unnamed_models)}) under the id it reads from the package; this "
            "script lacks their --model lines. Pass `--model ID` once per model: the ids are "
            "the MODEL column of `bioengine status --config FILE` while serve runs, and the "
            "'model ID: ...' lines serve prints (or set `id` in [[models]]).",
            err=True,
        )
    return executor, site.spec(models or site.configured_model_ids)


@slurm_app.command("script")
def script(
    config: Annotated[Path, typer.Option("--config", "-c", help="Path to site.toml.")],
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model",
            "-m",
            help="Triton model id to load at start, once per model (default: the `id`s in "
            "[[models]]). For an entry without `id`, pass the id serve gives it: the MODEL "
            "column of `bioengine status` while serve runs.",
        ),
    ] = None,
) -> None:
    """Print exactly the batch script `serve` submits for its next replica job.

    The job name's slot (`SHORT.N`) is the one the next job of this deployment takes (asked
    from squeue; 1 when Slurm does not answer). Submitting the output with `sbatch` starts a
    replica that `serve` adopts.
    """
    try:
        executor, spec = build_spec_and_executor(config, list(model or []))
        try:
            slot = executor.next_slot(spec.deployment)
        except ExecutorError as exc:
            slot = 1
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "no answer"
            typer.echo(f"note: Slurm does not answer ({first}); showing slot 1", err=True)
        text = executor.preview(spec, slot=slot)
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
