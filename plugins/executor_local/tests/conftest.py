"""Fixtures for the local executor tests: a state dir per test, an empty model repository."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from bioengine_core.contracts import BackendContext, ReplicaSpec, RepositoryLocation
from bioengine_core.errors import ExecutorError
from bioengine_core.testing import environ
from bioengine_core.testing.pytest_plugin import require_service
from bioengine_core.triton import find_triton


def triton_available() -> bool:
    """True when a real tritonserver can be found (PATH or the nvidia-pytriton wheel)."""
    try:
        find_triton()
    except ExecutorError:
        return False
    return True


@pytest.fixture
def triton() -> None:
    """Require the real tritonserver binary (skip locally, fail in CI)."""
    require_service(
        triton_available(), "tritonserver (pip install 'bioengine-executor-local[triton]')"
    )


@pytest.fixture
def deployment() -> str:
    """A deployment name unique to the test, so parallel or leftover replicas never mix."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def context(tmp_path: Path, deployment: str) -> BackendContext:
    """A backend context with its own state dir."""
    state = tmp_path / "state"
    state.mkdir()
    return BackendContext(deployment=deployment, state_dir=state, config_dir=tmp_path)


@pytest.fixture
def replica_spec(tmp_path: Path, deployment: str) -> ReplicaSpec:
    """A spec over an empty Triton model repository (enough for the server to become ready)."""
    repo = tmp_path / "repository"
    repo.mkdir()
    return ReplicaSpec(deployment=deployment, repository=RepositoryLocation(str(repo), repo))


@pytest.fixture
def identity_model(replica_spec: ReplicaSpec) -> str:
    """A python-backend model `ident` (y = x, 4 floats) in the spec's repository, loaded at start."""
    replica_spec.models = [environ.write_identity_model(Path(replica_spec.repository.uri))]
    return "ident"


@pytest.fixture
def engine_secrets(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """ENGINE_SECRETS in this process's environment (the engine's, for the executor)."""
    return environ.set_engine_secrets(monkeypatch)


@pytest.fixture
def check_replica_environ() -> Callable[..., list[psutil.Process]]:
    """`check(server_pid, secrets, expected)`: tritonserver and its python backend stubs carry
    none of the secret values and every expected variable; returns the processes checked."""
    return environ.check_replica_environ
