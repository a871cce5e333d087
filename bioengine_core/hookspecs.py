"""Every BioEngine hook. Plugins implement them with `@hookimpl`; the core calls them by keyword.

Registration hooks return typed records (contracts.ExecutorType, ...); lifecycle hooks let a
plugin observe the engine. Arguments may be added in later versions, never removed or renamed,
and an implementation may accept any subset of them (pluggy passes only what it names).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import typer

    from .contracts import (
        ExecutorType,
        GatewayType,
        ModelSourceType,
        ReplicaStatus,
        StorageType,
    )

PROJECT = "bioengine"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def bioengine_register_executors() -> list[ExecutorType]:
    """Called once when plugins load. Return the executors this plugin provides.

    Each `ExecutorType(name, settings, factory)` is selected by `[executor] kind = name`.
    """


@hookspec
def bioengine_register_storages() -> list[StorageType]:
    """Called once when plugins load. Return the storages this plugin provides (`[storage] kind`)."""


@hookspec
def bioengine_register_model_sources() -> list[ModelSourceType]:
    """Called once when plugins load. Return the model sources this plugin provides.

    A source handles the reference schemes listed in its record (`folder:`, `zip:`, `s3:`, ...).
    """


@hookspec
def bioengine_register_gateways() -> list[GatewayType]:
    """Called once when plugins load. Return the gateways this plugin provides (`[gateways.X] kind`)."""


@hookspec
def bioengine_add_commands(app: typer.Typer) -> None:
    """Called when the CLI is built. Add sub-commands or sub-apps to `app` (e.g. `bioengine slurm`)."""


@hookspec
def bioengine_engine_started(engine: Any, config: Any) -> None:
    """Called once serving begins: at least one replica is ready and every gateway has started."""


@hookspec
def bioengine_engine_stopping(engine: Any, config: Any) -> None:
    """Called when shutdown begins, before gateways stop and replicas are stopped."""


@hookspec
def bioengine_replica_state_changed(replica: ReplicaStatus, previous: str | None) -> None:
    """Called when the supervisor sees a replica change state (`previous` is None for a new one)."""


@hookspec
def bioengine_model_published(model_id: str, storage: Any) -> None:
    """Called after a model's Triton directory was published to the storage."""
