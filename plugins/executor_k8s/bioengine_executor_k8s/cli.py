"""`bioengine k8s ...`: print the manifests a site config applies; remove a deployment's objects."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from bioengine_core.errors import BioEngineError, ConfigError
from bioengine_core.site import Site, load_site

from . import manifests

if TYPE_CHECKING:
    from .executor import K8sExecutor

k8s_app = typer.Typer(help="Kubernetes executor: manifests and teardown.", no_args_is_help=True)


def _fail(message: str, code: int = 2) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(code)


@contextmanager
def _exit_on_error() -> Iterator[None]:
    """A ConfigError exits 2 listing its problems; another BioEngineError exits 1 with it."""
    try:
        yield
    except ConfigError as exc:
        raise _fail("invalid configuration:\n  - " + "\n  - ".join(exc.problems)) from None
    except BioEngineError as exc:
        raise _fail(str(exc), 1) from None


def open_site(config: Path) -> tuple[Site, K8sExecutor]:
    """The site `bioengine serve --config` would build, and its k8s executor (nothing applied)."""
    site = load_site(config, executor_kind="k8s")
    executor: K8sExecutor = site.executor  # type: ignore[assignment]
    return site, executor


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
    with _exit_on_error():
        site, executor = open_site(config)
        try:
            spec = site.spec(list(model or []) or site.configured_model_ids)
            docs = manifests.render_all(executor.settings, spec, replicas=replicas)
        finally:
            executor.close()
        text = manifests.to_yaml(docs)
    typer.echo(text, nl=False)


@k8s_app.command("delete")
def delete(
    config: Annotated[Path, typer.Option("--config", "-c", help="Path to site.toml.")],
) -> None:
    """Delete the deployment's Deployment, Service, Secret and one-off pods from the cluster."""
    with _exit_on_error():
        site, executor = open_site(config)
        deployment = site.config.engine.name
        try:
            executor.delete(deployment)
        finally:
            executor.close()
    typer.echo(f"deleted the objects of deployment {deployment!r} in {executor.ns}")
