"""The model catalog: which models this deployment serves, and how each got there.

It resolves a reference through the model sources, validates the package, builds its Triton
model directory, publishes it to the storage, and describes served models to the service
(listing, metadata, the package's test data). It starts no replica and sends no request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import ModelEntry
from .contracts import Executor, ModelInfo, ModelSource, Storage
from .errors import ModelError, ModelNotFoundError
from .sources import split_ref


@dataclass
class ServedModel:
    """A model this deployment serves: its package, how it was built, and counters."""

    id: str
    package: Any  # modelpkg.ModelPackage
    built: Any  # repository.BuiltModel
    entry: ModelEntry
    requests: int = 0
    errors: int = 0
    inflight: int = 0  # requests being answered now (a busy model is never unloaded)

    def info(self) -> ModelInfo:
        """What `list_models()` says about it."""
        pkg = self.package
        return ModelInfo(
            id=self.id,
            name=pkg.name,
            description=pkg.description,
            inputs=[_tensor_info(t) for t in pkg.inputs],
            outputs=[_tensor_info(t) for t in pkg.outputs],
            weight_format=self.built.weight_format,
            tags=list(pkg.tags),
        )


class ModelCatalog:
    """Resolves, builds, publishes and describes the served models."""

    def __init__(
        self,
        *,
        sources: dict[str, ModelSource],
        storage: Storage,
        executor: Executor,
        state_dir: Path,
        on_published: Callable[[str], None],
        say: Callable[[str], None],
    ) -> None:
        self.sources = sources
        self.storage = storage
        self.executor = executor
        self.state_dir = state_dir
        self.on_published = on_published
        self.say = say
        self.models: dict[str, ServedModel] = {}

    # ---------------------------------------------------------------- building
    def resolve(self, ref: str) -> Path:
        """The package directory a reference names (through the source for its scheme)."""
        scheme, _ = split_ref(ref)
        source = self.sources.get(scheme)
        if source is None:
            known = ", ".join(sorted(self.sources)) or "none"
            raise ModelError(f"no model source handles {scheme!r} in {ref!r} (installed: {known})")
        return source.resolve(ref, cache_dir=self.state_dir / "sources")

    def prepare(self, entry: ModelEntry, *, shared_runner: bool = False) -> ServedModel:
        """Resolve, validate, build and publish one model (blocking; runs in a thread);
        `shared_runner`: a python-backend model runs in the replica's shared runner."""
        from .modelpkg import load_package
        from .repository import build_triton_model

        package = load_package(self.resolve(entry.source), model_id=entry.id)
        build_root = self.state_dir / "build"
        build_root.mkdir(parents=True, exist_ok=True)
        built = build_triton_model(
            package,
            build_root,
            weight_format=entry.weight_format,
            backend=entry.backend,
            available_backends=self.executor.triton_backends(),
            max_batch_size=entry.max_batch_size,
            gpus=self.executor.replica_gpus(),
            shared_runner=shared_runner,
        )
        self.storage.put(built.name, built.path)
        self.on_published(built.name)
        self.say(
            f"model {built.name}: {built.weight_format} weights, {built.backend} backend, "
            f"published to {self.storage.location().uri}"
        )
        return ServedModel(built.name, package, built, entry)

    def prepare_ref(
        self, scheme: str, model_id: str, *, shared_runner: bool = False
    ) -> ServedModel:
        """Prepare the model `scheme:model_id` under that id (catalog mode's loads)."""
        entry = ModelEntry(source=f"{scheme}:{model_id}", id=model_id)
        return self.prepare(entry, shared_runner=shared_runner)

    def publish_runner(self) -> str:
        """Build and publish the shared runner model; its name."""
        from .runner import build_runner

        build_root = self.state_dir / "build"
        build_root.mkdir(parents=True, exist_ok=True)
        built = build_runner(build_root)
        self.storage.put(built.name, built.path)
        return built.name

    def listing(self, scheme: str) -> list[dict[str, Any]]:
        """What the source for `scheme` offers (its collection); ModelError when unknown."""
        source = self.sources.get(scheme)
        if source is None:
            raise ModelError(f"no model source handles {scheme!r}")
        return source.listing(cache_dir=self.state_dir / "sources")

    def add(self, served: ServedModel, *, replace: bool = False) -> None:
        """Serve `served`; ModelError when its id is taken (and `replace` is not set)."""
        if served.id in self.models and not replace:
            raise ModelError(f"two configured models resolve to the id {served.id!r}")
        self.models[served.id] = served

    def remove(self, model_id: str) -> None:
        """Stop listing a model (its replicas unload it first)."""
        self.models.pop(model_id, None)

    # ---------------------------------------------------------------- describing
    def get(self, model_id: str) -> ServedModel:
        """The served model; ModelNotFoundError (404) with the served ids otherwise."""
        model = self.models.get(model_id)
        if model is None:
            raise ModelNotFoundError(model_id, list(self.models))
        return model

    def ids(self) -> list[str]:
        """Ids of the served models, sorted."""
        return sorted(self.models)

    def infos(self) -> list[ModelInfo]:
        """Every served model as `list_models()` shows it."""
        return [m.info() for m in self.models.values()]

    def rows(self) -> list[dict[str, Any]]:
        """Per-model lines of the status: weights, backend, counters."""
        return [
            {
                "id": m.id,
                "weight_format": m.built.weight_format,
                "backend": m.built.backend,
                "requests": m.requests,
                "errors": m.errors,
            }
            for m in self.models.values()
        ]


def _tensor_info(t: Any) -> dict[str, Any]:
    return {
        "id": t.id,
        "dtype": t.dtype,
        "shape": list(t.shape),
        "axes": list(t.axes),
        "description": getattr(t, "description", ""),
    }


__all__ = ["ModelCatalog", "ServedModel"]
