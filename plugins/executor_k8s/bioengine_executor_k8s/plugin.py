"""Hook implementations: register the `k8s` executor and the `bioengine k8s` commands."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bioengine_core.contracts import BackendContext, ExecutorType
from bioengine_core.hookspecs import hookimpl

from .settings import K8sSettings

if TYPE_CHECKING:
    import typer

    from .executor import K8sExecutor


def make_executor(*, settings: K8sSettings, context: BackendContext) -> K8sExecutor:
    """Factory the core calls with the validated `[executor]` section."""
    from .executor import K8sExecutor

    return K8sExecutor(settings, context)


@hookimpl
def bioengine_register_executors() -> list[ExecutorType]:
    """The `k8s` executor."""
    return [
        ExecutorType(
            name="k8s",
            settings=K8sSettings,
            factory=make_executor,
            description="Triton replicas as a Kubernetes Deployment + Service (scaled by the engine)",
            preflight=_preflight,
        )
    ]


def _preflight(**kwargs):  # imported lazily: the kubernetes client is slow to import
    from .preflight import preflight

    return preflight(**kwargs)


@hookimpl
def bioengine_add_commands(app: typer.Typer) -> None:
    """Add `bioengine k8s manifest`."""
    from .cli import k8s_app

    app.add_typer(k8s_app, name="k8s")
