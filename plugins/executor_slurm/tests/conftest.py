"""Fixtures for the SLURM executor tests: a real cluster (.ci/start-slurm.sh), unique deployments."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from bioengine_executor_slurm import SlurmExecutor, SlurmSettings

from bioengine_core.contracts import BackendContext, ReplicaSpec, RepositoryLocation
from bioengine_core.repository import default_python_paths
from bioengine_core.testing.pytest_plugin import require_service

# Fast polling and a local-only bind: the test cluster is this machine.
TEST_SETTINGS = dict(
    cpus=1,
    time_limit="10",
    bind_address="127.0.0.1",
    poll_interval=0.5,
    ready_timeout=120,
    command_retries=2,
)


def slurm_works() -> bool:
    """True when squeue answers (a controller is reachable) and sbatch exists."""
    if not shutil.which("squeue") or not shutil.which("sbatch"):
        return False
    try:
        run = subprocess.run(["squeue", "-h"], capture_output=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return run.returncode == 0


@pytest.fixture(scope="session")
def slurm_cluster() -> None:
    """Require a running SLURM cluster (skip locally, fail in CI)."""
    require_service(slurm_works(), "a SLURM cluster (run .ci/start-slurm.sh)")


def scancel_names(*names: str) -> None:
    """Cancel every job with one of these names (test cleanup)."""
    for name in names:
        subprocess.run(["scancel", f"--name={name}"], capture_output=True, timeout=30)


@pytest.fixture
def deployment() -> Iterator[str]:
    """A deployment name no other test (or helper) uses; its jobs are cancelled afterwards."""
    name = f"t{uuid.uuid4().hex[:8]}"
    yield name
    scancel_names(f"bioengine-{name}", f"bioengine-{name}-other")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """An empty Triton model repository (Triton starts and is ready with no models)."""
    path = tmp_path / "repository"
    path.mkdir()
    return path


@pytest.fixture
def context(tmp_path: Path, deployment: str) -> BackendContext:
    """The engine-side context: state under tmp_path (shared with the node: same machine)."""
    return BackendContext(deployment=deployment, state_dir=tmp_path / "state", config_dir=tmp_path)


@pytest.fixture
def make_executor(context: BackendContext) -> Callable[..., SlurmExecutor]:
    """`make_executor(**overrides)`: a SlurmExecutor with the test settings."""

    def make(**overrides: object) -> SlurmExecutor:
        return SlurmExecutor(SlurmSettings(**{**TEST_SETTINGS, **overrides}), context)

    return make


@pytest.fixture
def spec(deployment: str, repo: Path) -> ReplicaSpec:
    """A replica over the empty repository."""
    return ReplicaSpec(
        deployment=deployment,
        repository=RepositoryLocation(uri=str(repo), local_path=repo),
        labels={"bioengine.deployment": deployment},
    )


ENGINE_SECRETS = {
    "BIOENGINE_ADMIN_TOKEN": "admin-token-4b1d9e",
    "HYPHA_ADMIN_SECRET": "hypha-secret-9c2f07",
    "AWS_SECRET_ACCESS_KEY": "engine-s3-secret-77e1a3",
}
"""Secret-looking variables of the engine that no replica needs (not in any replica env)."""


@pytest.fixture
def engine_secrets(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Put ENGINE_SECRETS into this process's environment (the submitter's, for sbatch)."""
    for key, value in ENGINE_SECRETS.items():
        monkeypatch.setenv(key, value)
    return dict(ENGINE_SECRETS)


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
def identity_model(spec: ReplicaSpec) -> str:
    """A python-backend model `ident` (y = x) in the spec's repository, loaded at start."""
    model = Path(spec.repository.uri) / "ident"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(IDENTITY_CONFIG)
    # the stub ignores PYTHONPATH: it must find this venv's packages itself (ENVIRONMENT.md)
    paths = default_python_paths()
    (model / "1" / "model.py").write_text(
        f"import sys\nsys.path[:0] = {paths!r}\n" + IDENTITY_MODEL
    )
    spec.models = ["ident"]
    return "ident"


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
