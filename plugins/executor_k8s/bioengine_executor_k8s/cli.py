"""`bioengine k8s ...`: print the manifests a site config applies; remove a deployment's objects."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bioengine_core.contracts import BackendContext, ReplicaSpec
from bioengine_core.errors import BioEngineError, ConfigError

from . import manifests
from .settings import K8sSettings

k8s_app = typer.Typer(help="Kubernetes executor: manifests and teardown.", no_args_is_help=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


def load_site(config: Path, models: list[str]) -> tuple[K8sSettings, BackendContext, ReplicaSpec]:
    """The executor settings, context and replica spec `bioengine serve --config` would use."""
    from bioengine_core.config import load_config

    cfg = load_config(config)
    if cfg.executor.record.name != "k8s":
        raise ConfigError(
            f"{config}: [executor] kind = {cfg.executor.record.name!r}; "
            '`bioengine k8s` needs kind = "k8s"'
        )
    context = cfg.context()
    storage = cfg.storage.record.factory(settings=cfg.storage.settings, context=context)
    spec = cfg.replica_spec(storage.location(), models or [m.id for m in cfg.models if m.id])
    return cfg.executor.settings, context, spec


@k8s_app.command("manifest")
def manifest(
    config: Annotated[Path, typer.Option("--config", "-c", help="Path to site.toml.")],
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="Triton model names to load (default: config ids)."),
    ] = None,
    replicas: Annotated[int, typer.Option(help="replicas in the rendered Deployment.")] = 1,
) -> None:
    """Print the Secret (values redacted), Deployment and Service as YAML; needs no cluster."""
    try:
        settings, _, spec = load_site(config, list(model or []))
        text = manifests.to_yaml(manifests.render_all(settings, spec, replicas=replicas))
    except ConfigError as exc:
        raise _fail("invalid configuration:\n  - " + "\n  - ".join(exc.problems)) from None
    except BioEngineError as exc:
        raise _fail(str(exc), 1) from None
    typer.echo(text, nl=False)


@k8s_app.command("delete")
def delete(
    config: Annotated[Path, typer.Option("--config", "-c", help="Path to site.toml.")],
) -> None:
    """Delete the deployment's Deployment, Service, Secret and one-off pods from the cluster."""
    from .executor import K8sExecutor

    try:
        settings, context, spec = load_site(config, [])
        executor = K8sExecutor(settings, context)
        executor.delete(spec.deployment)
        executor.close()
    except ConfigError as exc:
        raise _fail("invalid configuration:\n  - " + "\n  - ".join(exc.problems)) from None
    except BioEngineError as exc:
        raise _fail(str(exc), 1) from None
    typer.echo(f"deleted the objects of deployment {spec.deployment!r} in {settings.namespace}")
