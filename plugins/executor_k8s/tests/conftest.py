"""Fixtures: the kmock Kubernetes API emulator on a free port, reached through a kubeconfig file.

kmock stores objects and serves them over the real Kubernetes HTTP API, but runs no
controllers: a Deployment gets no pods and pods get no status unless a test writes them.
It runs in its own thread and event loop because the executor (like the engine's calls to it)
is synchronous.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from bioengine_executor_k8s import K8sExecutor, K8sSettings

from bioengine_core.contracts import BackendContext, ReplicaSpec, RepositoryLocation

kmock = pytest.importorskip("kmock", reason="kmock (the API emulator) is a test dependency")

NAMESPACE = "bioengine-test"


class EmulatedApi:
    """A kmock KubernetesEmulator served over HTTP from a background thread."""

    def __init__(self) -> None:
        self.denied: set[tuple[str, str, str]] = set()
        """(namespace, verb, resource) that access reviews answer "not allowed" (RBAC)."""
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._run(self._start())

    def _run(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        self.emulator = kmock.KubernetesEmulator()
        await self.emulator.__aenter__()
        self.emulator.resources.load_bundled()  # API discovery of the built-in resources
        self.server = kmock.Server(self.emulator)
        await self.server.__aenter__()
        self.url = str(self.server.url).rstrip("/")
        # kmock answers neither Namespace reads nor access reviews as a cluster does: react to
        # them here (namespaces exist once declared; RBAC allows all but `self.denied`)
        self.emulator["post /apis/authorization.k8s.io/v1/selfsubjectaccessreviews"] << (
            self._review
        )
        self._declare(NAMESPACE)

    def _review(self, request: Any) -> dict[str, Any]:
        # kmock stores each created object by name; reviews have none, so forget the last one
        for (res, _, _), obj in list(self.emulator.objects.items()):
            if res.plural == "selfsubjectaccessreviews" and not obj.deleted:
                obj.delete()
        attrs = request.data["spec"]["resourceAttributes"]
        resource = attrs["resource"] + (
            f"/{attrs['subresource']}" if attrs.get("subresource") else ""
        )
        allowed = (attrs.get("namespace"), attrs["verb"], resource) not in self.denied
        return {**request.data, "status": {"allowed": allowed}}

    def _declare(self, name: str) -> None:
        body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
        self.emulator[f"get /api/v1/namespaces/{name}"] << body

    def declare_namespace(self, name: str) -> None:
        """Make `GET /api/v1/namespaces/NAME` answer as for an existing namespace."""

        async def declare() -> None:
            self._declare(name)

        self._run(declare())

    def answer(self, criterion: str, status: int, message: str) -> None:
        """Answer requests matching `criterion` ("post /apis/...") with a Status error."""
        body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": status,
                "message": message}  # fmt: skip

        async def react() -> None:
            self.emulator[criterion] << status << body

        self._run(react())

    async def _stop(self) -> None:
        await self.server.__aexit__(None, None, None)
        await self.emulator.__aexit__(None, None, None)

    def close(self) -> None:
        """Stop the server and its thread."""
        try:
            self._run(self._stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    # --- inspection helpers (reads of the in-memory store)
    def _snapshot(self) -> list[tuple[Any, Any]]:
        async def snap() -> list[tuple[Any, Any]]:
            return list(self.emulator.objects.items())

        return self._run(snap())

    def get(self, resource: str, name: str, namespace: str = NAMESPACE) -> dict[str, Any] | None:
        """The stored object (a plain dict), or None when absent or deleted."""
        for (res, ns, nm), obj in self._snapshot():
            if str(res.plural) == resource and ns == namespace and nm == name and not obj.deleted:
                return obj.raw
        return None

    def names(self, resource: str, namespace: str = NAMESPACE) -> list[str]:
        """Names of the live objects of one resource (plural: deployments, pods, ...)."""
        return sorted(
            nm
            for (res, ns, nm), obj in self._snapshot()
            if str(res.plural) == resource and ns == namespace and not obj.deleted
        )

    def versions(self, resource: str, name: str, namespace: str = NAMESPACE) -> int:
        """How many versions the emulator recorded for an object (creation + each change)."""
        for (res, ns, nm), obj in self._snapshot():
            if str(res.plural) == resource and ns == namespace and nm == name:
                return len([v for v in obj.history if v is not None])
        return 0

    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request the emulator answered, in order."""
        return [(str(r.method.value), str(r.url.path)) for r in list(self.emulator)]


@pytest.fixture(scope="session")
def api() -> Iterator[EmulatedApi]:
    """One emulated API server for the session (tests use distinct deployments)."""
    server = EmulatedApi()
    yield server
    server.close()


@pytest.fixture
def kubeconfig(api: EmulatedApi, tmp_path: Path) -> Path:
    """A kubeconfig file pointing at the emulator, as an operator would write one."""
    path = tmp_path / "kubeconfig"
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "kmock", "cluster": {"server": api.url}}],
                "users": [{"name": "tester", "user": {"token": "not-checked"}}],
                "contexts": [
                    {
                        "name": "kmock",
                        "context": {"cluster": "kmock", "user": "tester", "namespace": NAMESPACE},
                    }
                ],
                "current-context": "kmock",
            }
        )
    )
    return path


@pytest.fixture
def deployment() -> str:
    """A deployment name no other test uses."""
    return f"t{uuid.uuid4().hex[:8]}"


@pytest.fixture
def context(tmp_path: Path, deployment: str) -> BackendContext:
    """The engine's context for the executor (deployment name, state and config dirs)."""
    return BackendContext(deployment=deployment, state_dir=tmp_path, config_dir=tmp_path)


def make_settings(kubeconfig: Path, **overrides: Any) -> K8sSettings:
    """Settings as a site.toml [executor] section would give them."""
    values: dict[str, Any] = {
        "kind": "k8s",
        "namespace": NAMESPACE,
        "kubeconfig": str(kubeconfig),
        "repository_pvc": "models",
        "request_timeout": 5.0,
    }
    values.update(overrides)
    return K8sSettings(**values)


@pytest.fixture
def settings_for(kubeconfig: Path) -> Any:
    """`settings_for(**overrides)`: settings for the emulator with some values changed."""

    def settings(**overrides: Any) -> K8sSettings:
        return make_settings(overrides.pop("kubeconfig", kubeconfig), **overrides)

    return settings


@pytest.fixture
def executor(kubeconfig: Path, context: BackendContext) -> Iterator[K8sExecutor]:
    """The executor under test, talking to the emulator through the kubeconfig."""
    ex = K8sExecutor(make_settings(kubeconfig), context)
    yield ex
    ex.close()


@pytest.fixture
def spec(deployment: str) -> ReplicaSpec:
    """What the engine asks for: Triton over the repository, two models, the deployment label."""
    return ReplicaSpec(
        deployment=deployment,
        repository=RepositoryLocation(uri="/srv/bioengine/models"),
        models=["affable-shark", "unet2d"],
        labels={"bioengine.deployment": deployment},
    )


# --------------------------------------------------------------------------- simulated cluster


class _ReadyHandler(BaseHTTPRequestHandler):
    """Answers Triton's health endpoints with 200 (what a ready Triton in a pod answers)."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        ok = self.path in ("/v2/health/ready", "/v2/health/live")
        self.send_response(200 if ok else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


class SimulatedCluster:
    """Plays the ReplicaSet controller and the kubelet against the emulator, in a thread.

    kmock runs no controllers, so this loop does their visible part: it gives every Deployment
    as many pods as its `spec.replicas` (deleting the newest extras), marks each new pod Running
    and Ready with its own loopback address 127.0.0.N, and serves the health endpoints there on
    the pod's HTTP port. Nothing else of Kubernetes (scheduling, probes, images) is simulated.
    """

    def __init__(self, api_client: Any, namespace: str, http_port: int):
        from kubernetes import client as k8s

        self.core = k8s.CoreV1Api(api_client)
        self.apps = k8s.AppsV1Api(api_client)
        self.ns = namespace
        self.http_port = http_port
        self.servers: dict[str, ThreadingHTTPServer] = {}
        self._next_ip = 2
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.reconcile()
            except Exception:  # noqa: BLE001 - the emulator may be mid-request; retry
                pass

    def _pods(self) -> list[dict[str, Any]]:
        resp = self.core.list_namespaced_pod(self.ns, _preload_content=False)
        return json.loads(resp.data).get("items") or []

    def reconcile(self) -> None:
        """One pass of the controller and the kubelet."""
        deployments = (
            json.loads(
                self.apps.list_namespaced_deployment(self.ns, _preload_content=False).data
            ).get("items")
            or []
        )
        pods = self._pods()
        for dep in deployments:
            selector = dep["spec"]["selector"]["matchLabels"]
            owned = [
                p
                for p in pods
                if all((p["metadata"].get("labels") or {}).get(k) == v for k, v in selector.items())
            ]
            want = dep["spec"].get("replicas", 1)
            for _ in range(want - len(owned)):
                name = f"{dep['metadata']['name']}-{uuid.uuid4().hex[:10]}"
                template = dep["spec"]["template"]
                self.core.create_namespaced_pod(
                    self.ns,
                    {
                        "apiVersion": "v1",
                        "kind": "Pod",
                        "metadata": {"name": name, "labels": template["metadata"]["labels"]},
                        "spec": template["spec"],
                    },
                )
            for extra in sorted(owned, key=lambda p: p["metadata"]["name"])[max(want, 0) :]:
                self.core.delete_namespaced_pod(extra["metadata"]["name"], self.ns)
        # the kubelet: start "Triton" for new pods, stop it for deleted ones
        pods = self._pods()
        alive = {p["metadata"]["name"] for p in pods}
        for pod in pods:
            name = pod["metadata"]["name"]
            if name in self.servers or (pod.get("status") or {}).get("podIP"):
                continue
            ip = f"127.0.0.{self._next_ip}"
            self._next_ip += 1
            server = ThreadingHTTPServer((ip, self.http_port), _ReadyHandler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            self.servers[name] = server
            self.core.patch_namespaced_pod(
                name,
                self.ns,
                {
                    "spec": {"nodeName": "sim-node"},
                    "status": {
                        "phase": "Running",
                        "podIP": ip,
                        "conditions": [
                            {"type": "PodScheduled", "status": "True"},
                            {"type": "Ready", "status": "True"},
                        ],
                    },
                },
                _content_type="application/merge-patch+json",
            )
        for name in list(self.servers):
            if name not in alive:
                self._shutdown(name)

    def _shutdown(self, name: str) -> None:
        server = self.servers.pop(name)
        server.shutdown()
        server.server_close()

    def close(self) -> None:
        """Stop the loop and every health server."""
        self._stop.set()
        self.thread.join(10)
        for name in list(self.servers):
            self._shutdown(name)


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def sim_namespace() -> str:
    """A namespace of its own, so the simulated controller sees only this test's objects."""
    return f"sim-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def http_port() -> int:
    """The pods' Triton HTTP port (each simulated pod listens on it at its own 127.0.0.N)."""
    return free_port()


@pytest.fixture
def simulated_cluster(
    kubeconfig: Path, sim_namespace: str, http_port: int
) -> Iterator[SimulatedCluster]:
    """kmock plus a simulated ReplicaSet controller and kubelet for one namespace."""
    from bioengine_executor_k8s import make_api_client

    api_client = make_api_client(K8sSettings(kind="k8s", kubeconfig=str(kubeconfig)))
    sim = SimulatedCluster(api_client, sim_namespace, http_port)
    yield sim
    sim.close()
    api_client.close()
