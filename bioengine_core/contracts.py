"""Public contracts for plugin authors: backend records, settings base, and the abstract backends.

Hooks *register* backends by returning the records defined here; the backends themselves are
classes implementing the small abstract interfaces below. Plugins import only this module and
`hookspecs`, `errors`, `commands`, `childenv`, `util`, `site`, `triton` and `testing` from
the core.

Size: over 400 lines because it is the plugin API reference (each member documented where it
is declared); splitting it would scatter that reference over several modules.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict

# --------------------------------------------------------------------------- settings


class BackendSettings(BaseModel):
    """Base of every backend's settings model: one config section, unknown keys rejected."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    kind: str


# --------------------------------------------------------------------------- context


@dataclass
class BackendContext:
    """What the core hands every backend factory besides its settings."""

    deployment: str
    """Name of this deployment; every replica is labelled with it (adoption after restarts)."""
    state_dir: Path
    """A directory the backend may use for pid files, logs and scratch data."""
    config_dir: Path
    """Directory of the site config; relative paths in settings are relative to it."""
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("bioengine"))
    progress: Callable[[str], None] | None = None
    """Shows a line to the operator (uploads, syncs, queue waits); None when nobody watches."""
    backend: str = ""
    """`family.kind` of the backend this context was made for (e.g. `executor.slurm`)."""

    @property
    def backend_dir(self) -> Path:
        """A directory of this backend's own below `state_dir` (created on first use), so two
        backends never collide over file names."""
        path = self.state_dir / "backends" / (self.backend or "shared")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def for_backend(self, family: str, kind: str) -> BackendContext:
        """A copy of this context for the backend `family.kind`."""
        return dataclasses.replace(self, backend=f"{family}.{kind}")

    def resolve_path(self, value: str | Path) -> Path:
        """Expand `~` and make `value` absolute relative to the config's directory."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.config_dir / path).resolve()


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class BackendType:
    """A registered backend: its `kind` name, settings model and factory.

    `factory(settings=..., context=...)` returns the backend instance.
    """

    name: str
    settings: type[BackendSettings]
    factory: Callable[..., Any]
    description: str = ""
    preflight: Callable[..., list[str]] | None = None
    """Optional `preflight(settings=..., context=..., offline=...)`: problems found *without
    starting anything* (an endpoint that does not answer, credentials it refuses, resources the
    infrastructure cannot give), one line each saying what is wrong and which setting or
    command fixes it. With `offline` only checks that need no network or cluster. `config check`
    and `serve` run it before anything starts; it must return within a few seconds."""

    family: ClassVar[str] = "backend"


@dataclass(frozen=True)
class ExecutorType(BackendType):
    """Registers an executor (runs inference-server replicas on some infrastructure)."""

    family: ClassVar[str] = "executor"


@dataclass(frozen=True)
class StorageType(BackendType):
    """Registers a storage (holds the Triton model repository where replicas can load it)."""

    family: ClassVar[str] = "storage"


@dataclass(frozen=True)
class ModelSourceType(BackendType):
    """Registers a model source for the reference schemes it handles (`folder`, `zip`, ...)."""

    schemes: tuple[str, ...] = ()
    family: ClassVar[str] = "source"


@dataclass(frozen=True)
class GatewayType(BackendType):
    """Registers a gateway (exposes the service API to users)."""

    family: ClassVar[str] = "gateway"


# --------------------------------------------------------------------------- executor


class ReplicaState(str, enum.Enum):
    """Life cycle of one inference-server replica, as an executor reports it."""

    PENDING = "pending"  # accepted, waiting for resources (a queued batch job)
    STARTING = "starting"  # running, but the server does not answer ready yet
    READY = "ready"  # the server answers /v2/health/ready with 200
    FAILED = "failed"  # ended or crashed without being asked to; the engine replaces it
    STOPPING = "stopping"  # asked to stop, not gone yet
    STOPPED = "stopped"  # gone after being asked to stop (or never existed)
    UNKNOWN = "unknown"  # the backend cannot tell right now (controller unreachable)

    @property
    def alive(self) -> bool:
        """True for states in which the replica may still serve or become ready."""
        return self in (ReplicaState.PENDING, ReplicaState.STARTING, ReplicaState.READY)


@dataclass
class RepositoryLocation:
    """How a replica reaches the model repository that a storage holds."""

    uri: str
    """What Triton gets as `--model-repository`: a path, or e.g. `s3://host:port/bucket/prefix`."""
    local_path: Path | None = None
    """The repository as a directory on this host, if it is one (for bind mounts)."""
    env: dict[str, str] = field(default_factory=dict)
    """Environment a replica needs to read it (credentials: never logged)."""


@dataclass
class ReplicaSpec:
    """What the engine asks an executor to run: one Triton server over a model repository."""

    deployment: str
    repository: RepositoryLocation
    models: list[str] = field(default_factory=list)
    """Triton model names to load at start (the server runs with explicit model control)."""
    labels: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    """Variables the replica needs (the storage's credentials): pass them to it, never log them."""
    gpus: int = 0
    """GPUs each replica gets, as the executor reports them through `replica_gpus()` (0: none, or
    the executor's own setting decides)."""


@dataclass
class ReplicaStatus:
    """What an executor knows about one replica."""

    replica_id: str
    state: ReplicaState
    url: str | None = None
    """Base URL of the replica's Triton HTTP endpoint, e.g. `http://127.0.0.1:8000`."""
    host: str | None = None
    message: str = ""
    """Human-readable detail: Slurm's pending reason, an exit code, a container error."""
    labels: dict[str, str] = field(default_factory=dict)
    started_at: float | None = None
    expires_at: float | None = None
    """Wall-clock time at which the backend will end the replica (a job's time limit)."""
    details: dict[str, Any] = field(default_factory=dict)
    """Backend specifics shown by `bioengine status` (pid, job id, container id)."""
    unsatisfiable: bool = False
    """The replica can never start as requested (a job asking for more CPUs than any node has);
    the engine then fails fast with `message` instead of waiting for `ready_timeout`."""


class Executor(ABC):
    """Runs inference-server replicas on some infrastructure.

    Two styles are supported. With `manages_replicas = False` (local processes, Slurm jobs) the
    engine starts and stops each replica and replaces failed ones. With `manages_replicas = True`
    (a Kubernetes Deployment) the engine only calls `scale()` and the platform keeps replicas
    alive; `list()` then reports what the platform runs.

    Methods are synchronous; the engine calls them from worker threads, and may call them
    concurrently (e.g. `status()` of two replicas while a third is started): an executor must be
    safe to use from several threads at once (guard shared state with a lock).
    """

    manages_replicas: ClassVar[bool] = False

    @abstractmethod
    def start(self, spec: ReplicaSpec) -> ReplicaStatus:
        """Start one replica and return at once (state PENDING or STARTING); never wait for ready."""

    @abstractmethod
    def status(self, replica_id: str) -> ReplicaStatus:
        """Current state of a replica; STOPPED for one that is gone after `stop()` or unknown."""

    @abstractmethod
    def stop(self, replica_id: str, *, grace: float = 10.0) -> None:
        """Stop a replica: ask politely, force after `grace` seconds. Idempotent."""

    @abstractmethod
    def logs(self, replica_id: str, *, tail: int = 200) -> str:
        """The last `tail` lines the replica's server wrote."""

    @abstractmethod
    def list(self, deployment: str) -> list[ReplicaStatus]:
        """Alive replicas labelled with `deployment`, including ones started by an earlier run."""

    def scale(self, spec: ReplicaSpec, replicas: int) -> None:
        """Set the number of replicas (only for executors with `manages_replicas = True`)."""
        raise NotImplementedError(f"{type(self).__name__} does not manage replicas itself")

    def preview(self, spec: ReplicaSpec) -> str:
        """What `start(spec)` would run (a command line, a batch script, a manifest)."""
        return ""

    def replica_gpus(self) -> list[int] | None:
        """GPU indices each replica sees (model instance groups are placed on them); None when
        replicas get no GPU or the executor cannot tell."""
        return None

    def triton_backends(self) -> list[str]:
        """Triton backends the replicas will have (`python`, `onnxruntime`, `pytorch`, ...).

        The repository builder uses native backends only when listed here; the default is the
        python backend alone (what the pip-shipped Triton has).
        """
        return ["python"]

    def close(self) -> None:
        """Release client resources; replicas keep running (they are stopped with `stop`)."""


# --------------------------------------------------------------------------- storage


class Storage(ABC):
    """Holds the Triton model repository: one directory per model, published whole."""

    @abstractmethod
    def put(self, name: str, source: Path) -> None:
        """Publish the model directory `source` as `name`, replacing an older one atomically."""

    @abstractmethod
    def get(self, name: str, dest: Path) -> Path:
        """Copy model `name` into the directory `dest` and return it; StorageError if absent."""

    @abstractmethod
    def list(self) -> list[str]:
        """Names of the published models, sorted."""

    @abstractmethod
    def delete(self, name: str) -> None:
        """Remove model `name`; idempotent."""

    @abstractmethod
    def location(self) -> RepositoryLocation:
        """How a replica reaches this repository."""


# --------------------------------------------------------------------------- model source


class ModelSource(ABC):
    """Turns a model reference such as `folder:./models/x` into a package directory on disk."""

    @abstractmethod
    def resolve(self, ref: str, *, cache_dir: Path) -> Path:
        """Return a directory holding the package's `rdf.yaml`/`bioimageio.yaml`; ModelError if not."""

    def listing(self, *, cache_dir: Path) -> list[dict[str, Any]]:
        """The models this source offers (id, name, description, tags, versions), for catalog
        mode's search; [] for a source that cannot list (a folder, a single URL)."""
        return []


# --------------------------------------------------------------------------- gateway


@dataclass
class ModelInfo:
    """One served model as the service lists it."""

    id: str
    name: str
    description: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    weight_format: str
    tags: list[str] = field(default_factory=list)


def _no_jobs() -> Exception:
    from .errors import InferenceError

    return InferenceError("this service runs no jobs", status=501)


class Service(ABC):
    """The service API that gateways expose; the only thing a gateway sees of the engine.

    Everything a gateway needs is here: readiness, metrics, the model list and descriptions,
    Triton's per-model GETs, inference (arrays or raw KServe bodies), model tests, status and
    the admin calls. Errors are `InferenceError`s carrying the HTTP status to answer.
    """

    # ---------------------------------------------------------------- models
    @abstractmethod
    def list_models(self) -> list[ModelInfo]:
        """The models this deployment serves."""

    @abstractmethod
    def model_ids(self) -> list[str]:
        """Ids of the served models, sorted (cheap: for routing checks)."""

    async def ensure_model(self, model_id: str) -> None:
        """Return once `model_id` can be served: in catalog mode an allowed model is loaded
        first (the caller waits); ModelNotFoundError (404) for a model not offered here."""
        if model_id not in self.model_ids():
            from .errors import ModelNotFoundError

            raise ModelNotFoundError(model_id, self.model_ids())

    def search_models(self, query: str = "", limit: int = 50) -> list[dict[str, Any]]:
        """Models offered here (in catalog mode: the whole allowed collection, loaded or not)
        whose id, name, description or tags contain every word of `query`; each with `state`."""
        words = query.lower().split()
        found = []
        for info in self.list_models():
            text = " ".join([info.id, info.name, info.description, *info.tags]).lower()
            if all(w in text for w in words):
                found.append({**info.__dict__, "state": "ready"})
        return found[:limit]

    @abstractmethod
    def get_model(self, model_id: str) -> dict[str, Any]:
        """The model's bioimage.io description (RDF) as a dict; ModelNotFoundError if unknown."""

    @abstractmethod
    def check_inputs(self, model_id: str, specs: dict[str, tuple[tuple[int, ...], str]]) -> None:
        """Check input shapes and dtype names (`{tensor id: (shape, "float32")}`) against the
        model before any tensor data is read or inflated; InvalidInputError naming the model
        and input, ModelNotFoundError for an unknown model."""

    def would_time_out(self, model_id: str, timeout: float | None) -> bool:
        """True when a request with this deadline (seconds) cannot be answered in time, so a
        gateway may answer 504 before reading its body. The default knows nothing: False."""
        return False

    # ---------------------------------------------------------------- inference
    @abstractmethod
    async def infer(
        self,
        model_id: str,
        inputs: dict[str, np.ndarray] | list[np.ndarray],
        *,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the model on numpy inputs (keyed by tensor id, or positional); pre/post applied."""

    @abstractmethod
    async def infer_raw(
        self, model_id: str, body: bytes, headers: dict[str, str], *, timeout: float | None = None
    ) -> tuple[int, bytes, dict[str, str]]:
        """Validate a KServe v2 HTTP infer body (`headers` may carry
        `Inference-Header-Content-Length`) against the model, rebuild it and send it to a ready
        replica; returns (status, body, headers) to answer with. InvalidInputError (400) for a
        wrong request."""

    @abstractmethod
    async def triton_get(
        self, model_id: str, what: str = "metadata", *, version: int | None = None
    ) -> tuple[int, bytes]:
        """Triton's answer (status, JSON body) to `GET /v2/models/ID[/versions/N][/what]` with
        `what` one of metadata, ready, config, stats, from a ready replica."""

    # ---------------------------------------------------------------- jobs
    async def submit_job(self, model_id: str, body: bytes, headers: dict[str, str]) -> dict:
        """Run a KServe infer body as a job (long work, e.g. a large tiled image); its info:
        id, state, progress {done, total}. 429 when too many jobs are kept."""
        raise _no_jobs()

    def job(self, job_id: str) -> dict[str, Any]:
        """A job's info (state: queued, running, done, failed, cancelled); 404 if unknown."""
        raise _no_jobs()

    def job_result(self, job_id: str) -> tuple[int, bytes, dict[str, str]]:
        """A finished job's answer as `infer_raw` gives it; 409 while it has none."""
        raise _no_jobs()

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """Stop a job (its blocks in flight finish, no more start); its info."""
        raise _no_jobs()

    @abstractmethod
    async def test_model(self, model_id: str) -> dict[str, Any]:
        """Run the model's own test inputs through the replicas and judge each output by the
        package's reproducibility tolerance (`bioengine_core.tolerance`): `{"model_id",
        "weight_format", "passed", "execution_time", "outputs": {id: {"passed", "max_abs_error",
        "max_rel_error", "mismatched_elements", "mismatched_per_million", "elements",
        "tolerance"}}}` (an output that could not be compared has "error" instead)."""

    async def sample_inputs(self, model_id: str) -> dict[str, np.ndarray]:
        """The model's own test inputs (from its package), by input id, for clients that offer
        "try it with the model's example"; this default has none (404)."""
        from .errors import InferenceError

        raise InferenceError(f"model '{model_id[:100]}' offers no sample inputs here", status=404)

    # ---------------------------------------------------------------- state
    @abstractmethod
    def ready_replicas(self) -> int:
        """Replicas accepting requests now (0: the service cannot answer; health probes)."""

    @abstractmethod
    def metrics_text(self) -> bytes:
        """Prometheus text exposition of the service's metrics (requests, latency, replicas)."""

    @abstractmethod
    def status(self) -> dict[str, Any]:
        """What runs where, as plain data for `bioengine status`:

        `deployment`, `executor` (kind), `storage` (`kind`, `uri`), `target_replicas`,
        `ready_replicas`, `replicas` (one dict each: `id`, `state`, `url`, `host`, `message`,
        `routed`, `adopted`, `started_at`, `expires_at`, `successor`, `requests`,
        `outstanding`, `details`), `models` (`id`, `weight_format`, `backend`, `requests`,
        `errors`), `gateways` (name → the gateway's `info()`), `uptime_s`. Holds process ids,
        endpoints and paths: show it to administrators only.
        """

    # ---------------------------------------------------------------- admin
    @abstractmethod
    async def load_model(self, ref: str, *, model_id: str | None = None) -> str:
        """Resolve, publish and load a model on every replica; returns its id (admin)."""

    @abstractmethod
    async def unload_model(self, model_id: str) -> None:
        """Unload a model from every replica (admin)."""

    @abstractmethod
    async def scale(self, replicas: int) -> None:
        """Change the target number of replicas (admin)."""


class Gateway(ABC):
    """Exposes the Service to users (HTTP, Hypha, ...). Runs inside the engine's event loop."""

    @abstractmethod
    async def start(self, service: Service) -> None:
        """Begin accepting requests for `service`."""

    @abstractmethod
    async def stop(self) -> None:
        """Stop accepting, finish in-flight requests, unregister."""

    @abstractmethod
    def info(self) -> dict[str, Any]:
        """`{"kind", "url", "state", ...}` for `bioengine status`."""


def now() -> float:
    """Wall-clock seconds; one place so tests can reason about expiry times."""
    return time.time()
