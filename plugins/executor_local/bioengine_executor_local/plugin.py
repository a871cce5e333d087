"""Hook implementation: register the `local` executor."""

from __future__ import annotations

from bioengine_core.contracts import BackendContext, Executor, ExecutorType
from bioengine_core.hookspecs import hookimpl

from .settings import LocalExecutorSettings


def make_executor(*, settings: LocalExecutorSettings, context: BackendContext) -> Executor:
    """Factory the core calls with the validated `[executor]` section."""
    from .container import ContainerExecutor
    from .process import ApptainerExecutor, ProcessExecutor

    if settings.mode == "process":
        return ProcessExecutor(settings, context)
    if settings.container_engine in ("apptainer", "singularity"):
        return ApptainerExecutor(settings, context)
    return ContainerExecutor(settings, context)


@hookimpl
def bioengine_register_executors() -> list[ExecutorType]:
    """The `local` executor."""
    return [
        ExecutorType(
            name="local",
            settings=LocalExecutorSettings,
            factory=make_executor,
            description="Triton replicas on this host: processes, or docker/podman/apptainer",
        )
    ]
