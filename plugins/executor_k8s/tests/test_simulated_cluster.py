"""The core's managed-executor conformance suite and the real engine, on an emulated cluster.

The API server is kmock; conftest's SimulatedCluster plays the ReplicaSet controller and the
kubelet (pods appear for `spec.replicas`, become Ready at 127.0.0.N and answer the health
endpoints). This checks the executor's contract and its use by `Engine` end to end, without
claiming anything about real scheduling, probes or images (see test_real_cluster.py).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from bioengine_executor_k8s import K8sExecutor
from bioengine_executor_k8s import manifests as m

from bioengine_core.config import load_config
from bioengine_core.contracts import BackendContext, ReplicaSpec, ReplicaState, RepositoryLocation
from bioengine_core.engine import Engine
from bioengine_core.testing.executor import ManagedExecutorConformance


class TestEmulatedClusterConformance(ManagedExecutorConformance):
    """ManagedExecutorConformance: scale up, adopt after a restart, scale to zero."""

    ready_timeout = 15.0
    stop_timeout = 15.0

    @pytest.fixture
    def executor(
        self, simulated_cluster: Any, settings_for: Any, sim_namespace: str, http_port: int
    ) -> Any:
        ex = K8sExecutor(
            settings_for(namespace=sim_namespace, http_port=http_port),
            BackendContext(deployment="conf", state_dir=Path("."), config_dir=Path(".")),
        )
        yield ex
        ex.close()

    @pytest.fixture
    def restarted_executor(self, settings_for: Any, sim_namespace: str, http_port: int) -> Any:
        ex = K8sExecutor(
            settings_for(namespace=sim_namespace, http_port=http_port),
            BackendContext(deployment="conf", state_dir=Path("."), config_dir=Path(".")),
        )
        yield ex
        ex.close()

    @pytest.fixture
    def replica_spec(self) -> ReplicaSpec:
        return ReplicaSpec(
            deployment="conf",
            repository=RepositoryLocation(uri="/srv/models"),
            labels={m.DEPLOYMENT_LABEL: "conf"},
        )


def test_simulated_controller_replaces_a_stopped_pod(
    simulated_cluster: Any, settings_for: Any, sim_namespace: str, http_port: int, tmp_path: Path
) -> None:
    """stop() deletes one pod; the Deployment (here: the simulated controller) replaces it."""
    ctx = BackendContext(deployment="repl", state_dir=tmp_path, config_dir=tmp_path)
    ex = K8sExecutor(settings_for(namespace=sim_namespace, http_port=http_port), ctx)
    spec = ReplicaSpec(deployment="repl", repository=RepositoryLocation(uri="/srv/models"))
    ex.scale(spec, 2)
    first = _wait(lambda: _ready_ids(ex, "repl"), 2)
    victim = sorted(first)[0]
    ex.stop(victim)
    after = _wait(lambda: _ready_ids(ex, "repl") - {victim}, 2)
    assert victim not in after and len(after) == 2
    ex.close()


def _ready_ids(ex: K8sExecutor, deployment: str) -> set[str]:
    return {s.replica_id for s in ex.list(deployment) if s.state is ReplicaState.READY}


def _wait(probe: Any, count: int, timeout: float = 15.0) -> set[str]:
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if len(got) == count or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


async def test_engine_scales_routes_and_stops_through_the_deployment(
    simulated_cluster: Any,
    api: Any,
    kubeconfig: Path,
    sim_namespace: str,
    http_port: int,
    tmp_path: Path,
) -> None:
    """`Engine` with `[executor] kind = "k8s"`: start scales the Deployment to 2 and routes its
    ready pods; an admin scale to 3 patches /scale; shutdown scales to 0 and keeps the objects."""
    site = tmp_path / "site.toml"
    site.write_text(
        f"""
[engine]
name = "k8s-e2e"
state_dir = "state"
replicas = 2
ready_timeout = 30
health_interval = 0.2

[executor]
kind = "k8s"
kubeconfig = "{kubeconfig}"
namespace = "{sim_namespace}"
http_port = {http_port}
repository_host_path = "/srv/bioengine"

[storage]
kind = "local"

[gateways]
"""
    )
    config = load_config(site)
    engine = Engine(config)
    assert isinstance(engine.executor, K8sExecutor)
    await engine.start()
    try:
        name = m.names_for(engine.executor.settings, "k8s-e2e").base
        dep = api.get("deployments", name, sim_namespace)
        assert dep["spec"]["replicas"] == 2
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--model-repository=/models" in args
        await _until(lambda: engine.router.ready_count() == 2)
        urls = sorted(r.url for r in engine.router.routes.values())
        assert len(set(urls)) == 2 and all(u.endswith(f":{http_port}") for u in urls)

        await engine.scale(3)
        assert api.get("deployments", name, sim_namespace)["spec"]["replicas"] == 3
        await _until(lambda: engine.router.ready_count() == 3)
    finally:
        await engine.stop()
    assert api.get("deployments", name, sim_namespace)["spec"]["replicas"] == 0
    assert api.get("services", name, sim_namespace) is not None


async def _until(probe: Any, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not probe():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)
