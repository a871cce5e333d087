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
from bioengine_core.testing import environ
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


def deployment_jobs(deployment: str) -> dict[str, tuple[str, str]]:
    """Job id -> (name, state) of the jobs squeue lists for `deployment` (by the job comment
    that names it: job names hold only its first characters)."""
    run = subprocess.run(
        ["squeue", "-h", "-t", "all", "-o", "%i|%j|%T|%k"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    found = {}
    for line in run.stdout.splitlines():
        job_id, name, state, comment = line.split("|", 3)
        labels = comment.removeprefix("bioengine:").split(",")
        if comment.startswith("bioengine:") and f"bioengine.deployment={deployment}" in labels:
            found[job_id] = (name, state)
    return found


def scancel_deployments(*deployments: str) -> None:
    """Cancel every job of these deployments (test cleanup)."""
    for deployment in deployments:
        ids = list(deployment_jobs(deployment))
        if ids:
            subprocess.run(["scancel", *ids], capture_output=True, timeout=30)


@pytest.fixture
def foreign_job(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """`submit(name, *options)`: a job that is not BioEngine's (same user, `sleep 300`), by id;
    every such job is cancelled afterwards."""
    submitted: list[str] = []

    def submit(name: str, *options: str) -> str:
        job_id = subprocess.run(
            ["sbatch", "--parsable", f"--job-name={name}", *options, "-t", "5"]
            + [f"--output={tmp_path}/foreign.out", "--wrap", "sleep 300"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        submitted.append(job_id)
        return job_id

    yield submit
    for job_id in submitted:
        subprocess.run(["scancel", job_id], capture_output=True, timeout=30)


@pytest.fixture(name="deployment_jobs")
def deployment_jobs_fixture() -> Callable[[str], dict[str, tuple[str, str]]]:
    """`deployment_jobs(name)`: job id -> (job name, state) of that deployment's jobs."""
    return deployment_jobs


@pytest.fixture
def deployment() -> Iterator[str]:
    """A deployment name no other test (or helper) uses; its jobs are cancelled afterwards."""
    name = f"t{uuid.uuid4().hex[:8]}"
    yield name
    scancel_deployments(name, f"{name}-other")


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


@pytest.fixture
def engine_secrets(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """ENGINE_SECRETS in this process's environment (the submitter's, for sbatch)."""
    return environ.set_engine_secrets(monkeypatch)


@pytest.fixture
def identity_model(spec: ReplicaSpec) -> str:
    """A python-backend model `ident` (y = x) in the spec's repository, loaded at start."""
    spec.models = [environ.write_identity_model(Path(spec.repository.uri))]
    return "ident"


@pytest.fixture
def check_replica_environ() -> Callable[..., list[psutil.Process]]:
    """`check(server_pid, secrets, expected)`: tritonserver and its python backend stubs carry
    none of the secret values and every expected variable; returns the processes checked."""
    return environ.check_replica_environ
