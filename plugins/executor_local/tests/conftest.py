"""Fixtures for the local executor tests: a state dir per test, an empty model repository."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from bioengine_core.contracts import BackendContext, ReplicaSpec, RepositoryLocation
from bioengine_core.errors import ExecutorError
from bioengine_core.repository import default_python_paths
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


IDENTITY_CONFIG = """name: "ident"
backend: "python"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""
IDENTITY_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())]
            )
            for r in requests
        ]
"""


@pytest.fixture
def identity_model(replica_spec: ReplicaSpec) -> str:
    """A python-backend model `ident` (y = x, 4 floats) in the spec's repository, loaded at start."""
    model = Path(replica_spec.repository.uri) / "ident"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(IDENTITY_CONFIG)
    # the stub ignores PYTHONPATH: put this venv's site-packages first, or pb_utils may import
    # another numpy and send empty outputs (ENVIRONMENT.md)
    paths = default_python_paths()
    (model / "1" / "model.py").write_text(
        f"import sys\nsys.path[:0] = {paths!r}\n" + IDENTITY_MODEL
    )
    replica_spec.models = ["ident"]
    return "ident"


ENGINE_SECRETS = {
    "BIOENGINE_ADMIN_TOKEN": "admin-token-4b1d9e",
    "HYPHA_ADMIN_SECRET": "hypha-secret-9c2f07",
    "AWS_SECRET_ACCESS_KEY": "engine-s3-secret-77e1a3",
}
"""Secret-looking variables of the engine that no replica needs (not in any replica env)."""


@pytest.fixture
def engine_secrets(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Put ENGINE_SECRETS into this process's environment (the engine's, for the executor)."""
    for key, value in ENGINE_SECRETS.items():
        monkeypatch.setenv(key, value)
    return dict(ENGINE_SECRETS)


def environ_of(pid: int) -> tuple[bytes, dict[str, str]]:
    """The environment process `pid` started with: raw /proc/PID/environ and parsed."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return raw, {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


@pytest.fixture
def check_replica_environ() -> Callable[..., list[psutil.Process]]:
    """`check(server_pid, secrets, expected)`: tritonserver and its python backend stubs carry
    none of the secret values and every expected variable; returns the processes checked."""

    def check(
        server_pid: int, secrets: dict[str, str], expected: dict[str, str]
    ) -> list[psutil.Process]:
        server = psutil.Process(server_pid)
        stubs = [
            p
            for p in server.children(recursive=True)
            if "triton_python_backend_stub" in " ".join([p.name(), *p.cmdline()[:1]])
        ]
        assert stubs, "a python-backend model runs in a triton_python_backend_stub process"
        for proc in [server, *stubs]:
            raw, env = environ_of(proc.pid)
            for name, value in secrets.items():
                assert value.encode() not in raw, f"{name} reached {proc.name()} ({proc.pid})"
            missing = {k: v for k, v in expected.items() if env.get(k) != v}
            assert not missing, f"{proc.name()} ({proc.pid}) lacks {missing}"
        return [server, *stubs]

    return check
