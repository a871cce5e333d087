"""The k8s executor against a real Kubernetes cluster: runs only with BIOENGINE_K8S_KUBECONFIG.

No cluster can run on the development and CI machines of this project (no API server, kind,
k3s or kwok is installable there), so this module is skipped unless BIOENGINE_K8S_KUBECONFIG
names a kubeconfig file, also under CI=true. Run it by hand against a test cluster:

    BIOENGINE_K8S_KUBECONFIG=~/.kube/config BIOENGINE_K8S_NAMESPACE=bioengine-test \\
        pytest plugins/executor_k8s/tests/test_real_cluster.py

Environment:
- BIOENGINE_K8S_KUBECONFIG: kubeconfig file (required); BIOENGINE_K8S_CONTEXT: its context.
- BIOENGINE_K8S_NAMESPACE: an existing namespace the tests may create objects in
  (default `default`). Every object is deleted at the end of its test.
- BIOENGINE_K8S_IMAGE: the Triton image (default NVIDIA's; pulling it takes minutes).
- BIOENGINE_K8S_READY_TIMEOUT: seconds a pod may take to become Ready (default 900).
- BIOENGINE_K8S_GPUS: GPUs per pod (default 0).
- BIOENGINE_K8S_POD_NETWORK=0: the test host cannot reach pod IPs (it is not in the cluster or
  on its pod network): then the conformance suite, which probes each replica's URL over HTTP,
  is skipped and only the API-level tests run.

Triton serves an empty model repository: the node's /tmp through a hostPath volume.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from bioengine_executor_k8s import K8sExecutor, K8sSettings
from bioengine_executor_k8s import manifests as m

from bioengine_core.contracts import BackendContext, ReplicaSpec, ReplicaState, RepositoryLocation
from bioengine_core.testing.executor import ManagedExecutorConformance

KUBECONFIG = os.environ.get("BIOENGINE_K8S_KUBECONFIG")
pytestmark = pytest.mark.skipif(
    not KUBECONFIG,
    reason="no Kubernetes cluster: set BIOENGINE_K8S_KUBECONFIG to run (never available on "
    "the project's machines, so skipped in CI too)",
)
POD_NETWORK = os.environ.get("BIOENGINE_K8S_POD_NETWORK", "1") != "0"
READY_TIMEOUT = float(os.environ.get("BIOENGINE_K8S_READY_TIMEOUT", "900"))


def real_settings(**overrides: Any) -> K8sSettings:
    """Settings for the test cluster from the environment: small pods, empty repository."""
    values: dict[str, Any] = {
        "kind": "k8s",
        "kubeconfig": str(Path(KUBECONFIG or "").expanduser()),
        "context": os.environ.get("BIOENGINE_K8S_CONTEXT"),
        "namespace": os.environ.get("BIOENGINE_K8S_NAMESPACE", "default"),
        "repository_host_path": "/tmp",
        "cpu_request": "250m",
        "memory_request": "512Mi",
        "shm_size": "256Mi",
        "gpus": int(os.environ.get("BIOENGINE_K8S_GPUS", "0")),
        "termination_grace": 5,
        "probe_period": 2,
        "name_prefix": "bioengine-test",
    }
    if os.environ.get("BIOENGINE_K8S_IMAGE"):
        values["image"] = os.environ["BIOENGINE_K8S_IMAGE"]
    values.update(overrides)
    return K8sSettings(**values)


def _context(deployment: str, tmp_path: Path) -> BackendContext:
    return BackendContext(deployment=deployment, state_dir=tmp_path, config_dir=tmp_path)


def _spec(deployment: str) -> ReplicaSpec:
    return ReplicaSpec(
        deployment=deployment,
        repository=RepositoryLocation(uri="/tmp"),
        labels={m.DEPLOYMENT_LABEL: deployment},
    )


@pytest.fixture
def deployment_name() -> str:
    """A deployment name no other run uses (several developers may share a test namespace)."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def real_executor(deployment_name: str, tmp_path: Path) -> Any:
    """An executor on the real cluster; deletes everything of its deployments afterwards."""
    ex = K8sExecutor(real_settings(), _context(deployment_name, tmp_path))
    yield ex
    for name in (deployment_name, f"{deployment_name}-other"):
        ex.delete(name, grace=0)
    ex.close()


@pytest.mark.skipif(not POD_NETWORK, reason="BIOENGINE_K8S_POD_NETWORK=0: pod IPs unreachable")
class TestRealClusterConformance(ManagedExecutorConformance):
    """The core's managed-executor suite: replicas come up Ready and answer over HTTP."""

    ready_timeout = READY_TIMEOUT
    stop_timeout = 120.0
    poll_interval = 2.0

    @pytest.fixture
    def executor(self, real_executor: K8sExecutor) -> K8sExecutor:
        return real_executor

    @pytest.fixture
    def restarted_executor(self, deployment_name: str, tmp_path: Path) -> Any:
        ex = K8sExecutor(real_settings(), _context(deployment_name, tmp_path))
        yield ex
        ex.close()

    @pytest.fixture
    def replica_spec(self, deployment_name: str) -> ReplicaSpec:
        return _spec(deployment_name)


def _wait_for(probe: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what} not reached within {timeout} s", pytrace=False)
        time.sleep(2)


def test_deployment_becomes_available_and_pods_ready(
    real_executor: K8sExecutor, deployment_name: str
) -> None:
    """scale(spec, 2): the Deployment reports 2 available replicas; list() says READY for both
    (the kubelet's readiness probe on /v2/health/ready passed); the logs come from Triton."""
    spec = _spec(deployment_name)
    real_executor.scale(spec, 2)
    name = m.names_for(real_executor.settings, deployment_name).base

    def available() -> bool:
        dep = real_executor.apps.read_namespaced_deployment(name, real_executor.ns)
        return ((dep.status and dep.status.available_replicas) or 0) == 2

    _wait_for(available, READY_TIMEOUT, "2 available replicas")
    listed = real_executor.list(deployment_name)
    assert len(listed) == 2 and all(s.state is ReplicaState.READY for s in listed), listed
    assert all(s.url and s.url.endswith(":8000") for s in listed)
    assert "HTTPService" in real_executor.logs(listed[0].replica_id, tail=200)


def test_stopped_pod_is_replaced_and_scale_to_zero_empties(
    real_executor: K8sExecutor, deployment_name: str
) -> None:
    """stop() deletes a pod and the Deployment replaces it; scale(0) removes every pod."""
    spec = _spec(deployment_name)
    real_executor.scale(spec, 1)
    (first,) = _wait_for(
        lambda: [s for s in real_executor.list(deployment_name) if s.state is ReplicaState.READY],
        READY_TIMEOUT,
        "one ready pod",
    )
    real_executor.stop(first.replica_id, grace=1)
    _wait_for(
        lambda: [
            s
            for s in real_executor.list(deployment_name)
            if s.replica_id != first.replica_id and s.state.alive
        ],
        120,
        "a replacement pod",
    )
    real_executor.scale(spec, 0)
    _wait_for(lambda: real_executor.list(deployment_name) == [], 120, "no pods after scale(0)")


def test_restart_adopts_without_rolling_the_pods(
    real_executor: K8sExecutor, deployment_name: str, tmp_path: Path
) -> None:
    """A second executor with the same settings leaves the Deployment's generation unchanged."""
    spec = _spec(deployment_name)
    real_executor.scale(spec, 1)
    name = m.names_for(real_executor.settings, deployment_name).base
    before = real_executor.apps.read_namespaced_deployment(name, real_executor.ns)
    again = K8sExecutor(real_settings(), _context(deployment_name, tmp_path))
    again.scale(spec, 1)
    after = again.apps.read_namespaced_deployment(name, again.ns)
    again.close()
    assert after.metadata.generation == before.metadata.generation


def test_one_off_pod_from_start(real_executor: K8sExecutor, deployment_name: str) -> None:
    """start() runs a standalone pod that becomes Ready; stop() deletes it for good."""
    status = real_executor.start(_spec(deployment_name))
    assert status.state in (ReplicaState.PENDING, ReplicaState.STARTING)
    _wait_for(
        lambda: real_executor.status(status.replica_id).state is ReplicaState.READY,
        READY_TIMEOUT,
        "the one-off pod Ready",
    )
    real_executor.stop(status.replica_id, grace=1)
    _wait_for(
        lambda: real_executor.status(status.replica_id).state is ReplicaState.STOPPED,
        120,
        "the one-off pod gone",
    )


def test_preflight_passes_against_the_real_cluster(tmp_path: Path) -> None:
    """The API answers, the namespace exists and every permission the executor uses is granted
    (the suite's namespace must carry the Role of docs/kubernetes.md)."""
    from bioengine_executor_k8s.preflight import preflight

    context = _context("preflight", tmp_path)
    assert preflight(settings=real_settings(), context=context, offline=False) == []
