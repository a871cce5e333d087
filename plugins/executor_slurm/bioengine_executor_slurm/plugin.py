"""Hook implementations: register the `slurm` executor and the `bioengine slurm` commands."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bioengine_core.contracts import BackendContext, ExecutorType
from bioengine_core.hookspecs import hookimpl

from .executor import SlurmExecutor
from .preflight import preflight
from .settings import SlurmSettings

if TYPE_CHECKING:
    import typer


def make_executor(*, settings: SlurmSettings, context: BackendContext) -> SlurmExecutor:
    """Factory the core calls with the validated `[executor]` section."""
    return SlurmExecutor(settings, context)


@hookimpl
def bioengine_register_executors() -> list[ExecutorType]:
    """The `slurm` executor."""
    return [
        ExecutorType(
            name="slurm",
            settings=SlurmSettings,
            factory=make_executor,
            description="Triton replicas as SLURM batch jobs (sbatch/squeue/scancel)",
            preflight=preflight,
        )
    ]


@hookimpl
def bioengine_add_commands(app: typer.Typer) -> None:
    """Add `bioengine slurm script|template`."""
    from .cli import slurm_app

    app.add_typer(slurm_app, name="slurm")
