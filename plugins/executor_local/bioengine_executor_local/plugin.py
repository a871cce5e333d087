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


def preflight(
    *, settings: LocalExecutorSettings, context: BackendContext, offline: bool
) -> list[str]:
    """What this host must have (needs no network): Triton or the container engine, and
    enough free ports in `port_range`."""
    import shutil

    from bioengine_core.errors import ExecutorError
    from bioengine_core.triton import find_triton

    from .common import replica_ports

    problems = []
    if settings.mode == "process":
        try:
            find_triton(settings.triton_binary)
        except ExecutorError as exc:
            fix = (
                "fix [executor] triton_binary"
                if settings.triton_binary
                else "pip install 'bioengine-executor-local[triton]' or set [executor] triton_binary"
            )
            problems.append(f"{exc}: {fix}")
    elif shutil.which(settings.container_engine) is None:
        problems.append(
            f"container_engine = {settings.container_engine!r} but no {settings.container_engine}"
            " command is on PATH: install it or choose another [executor] container_engine"
        )
    if settings.port_range:
        try:
            replica_ports(settings, [])
        except ExecutorError as exc:
            problems.append(str(exc))
    return problems


@hookimpl
def bioengine_register_executors() -> list[ExecutorType]:
    """The `local` executor."""
    return [
        ExecutorType(
            name="local",
            settings=LocalExecutorSettings,
            factory=make_executor,
            description="Triton replicas on this host: processes, or docker/podman/apptainer",
            preflight=preflight,
        )
    ]
