"""A validated site, for plugin commands that preview what `serve` would do (a public module).

`bioengine slurm script` and `bioengine k8s manifest` need what `serve` builds before it starts
anything: the validated config, the configured executor and storage, and the replica spec.
`load_site` gives exactly that, so previews and `serve` cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import SiteConfig, load_config
from .contracts import Executor, ReplicaSpec, Storage
from .errors import ConfigError
from .plugins import PluginManager


@dataclass
class Site:
    """A validated config with its executor and storage built (nothing started)."""

    config: SiteConfig
    executor: Executor
    storage: Storage

    def spec(self, models: list[str]) -> ReplicaSpec:
        """The replica spec `serve` would hand the executor for these Triton model names."""
        return self.config.replica_spec(self.storage.location(), models, gpus=self.gpus())

    def gpus(self) -> int:
        """GPUs each replica gets (from the executor)."""
        return len(self.executor.replica_gpus() or [])

    @property
    def configured_model_ids(self) -> list[str]:
        """Ids given in `[[models]]` (models without an id get theirs from the package)."""
        return sorted(m.id for m in self.config.models if m.id)

    @property
    def unnamed_models(self) -> list[str]:
        """Sources of `[[models]]` entries without an `id`."""
        return [m.source for m in self.config.models if not m.id]


def load_site(
    path: str | Path, *, executor_kind: str | None = None, plugins: PluginManager | None = None
) -> Site:
    """Validate `path` and build its executor and storage; ConfigError when the executor is not
    of `executor_kind` (a plugin command for another backend)."""
    config = load_config(path, plugins)
    kind = config.executor.record.name
    if executor_kind is not None and kind != executor_kind:
        raise ConfigError(
            f"{path}: [executor] kind = {kind!r}; "
            f'`bioengine {executor_kind}` needs kind = "{executor_kind}"'
        )
    context = config.context()
    executor: Any = config.executor.record.factory(
        settings=config.executor.settings, context=context
    )
    storage: Any = config.storage.record.factory(settings=config.storage.settings, context=context)
    return Site(config=config, executor=executor, storage=storage)


__all__ = ["Site", "load_site"]
