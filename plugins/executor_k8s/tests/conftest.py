"""Fixtures: the kmock Kubernetes API emulator on a free port, reached through a kubeconfig file.

kmock stores objects and serves them over the real Kubernetes HTTP API, but runs no
controllers: a Deployment gets no pods and pods get no status unless a test writes them.
It runs in its own thread and event loop because the executor (like the engine's calls to it)
is synchronous.
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
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
