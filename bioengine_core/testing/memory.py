"""An in-memory executor for tests, and deliberately broken variants of it.

`MemoryExecutor` runs each "replica" as a tiny HTTP server in a thread of this process that
answers `GET /v2/health/ready` (200 after `ready_delay` seconds, 503 before). Its state lives in a
class-level registry keyed by `namespace`, so a second instance with the same namespace adopts the
replicas of the first, as a restarted engine would. It is a reference implementation of the
executor contract, handy for testing engines, supervisors and routers without Triton.

`BrokenExecutor(faults=...)` breaks one contract rule per fault name in `FAULTS`; the core's tests
run the conformance suite against it to show that the suite catches each breakage.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

from ..contracts import Executor, ReplicaSpec, ReplicaState, ReplicaStatus
from .executor import DEPLOYMENT_LABEL


class _Handler(BaseHTTPRequestHandler):
    """Answers the KServe v2 health endpoints of one in-memory replica."""

    server: _ReplicaServer

    def do_GET(self) -> None:  # noqa: N802 - http.server naming
        replica = self.server.replica
        if self.path == "/v2/health/live":
            code = 200
        elif self.path == "/v2/health/ready":
            code = 200 if time.monotonic() >= replica.ready_at else 503
        else:
            code = 404
        replica.log(f"GET {self.path} {code}")
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        """Silence http.server's stderr logging (the replica keeps its own log)."""


class _ReplicaServer(ThreadingHTTPServer):
    daemon_threads = True
    replica: _Replica


@dataclass
class _Replica:
    replica_id: str
    deployment: str
    labels: dict[str, str]
    ready_at: float
    started_at: float
    server: _ReplicaServer | None = None
    lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2] if self.server else ("127.0.0.1", 0)
        return f"http://{host}:{port}"

    def log(self, line: str) -> None:
        self.lines.append(f"{time.strftime('%H:%M:%S')} {line}")
        del self.lines[:-1000]

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class MemoryExecutor(Executor):
    """Replicas are in-thread HTTP servers; state is shared by all instances of one namespace."""

    _registry: ClassVar[dict[str, dict[str, _Replica]]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()
    _ids: ClassVar[itertools.count] = itertools.count(1)

    def __init__(self, namespace: str = "default", *, ready_delay: float = 0.3):
        self.namespace = namespace
        self.ready_delay = ready_delay
        with self._lock:
            self._registry.setdefault(namespace, {})

    @property
    def _replicas(self) -> dict[str, _Replica]:
        return self._registry[self.namespace]

    def _status(self, r: _Replica) -> ReplicaStatus:
        state = ReplicaState.READY if time.monotonic() >= r.ready_at else ReplicaState.STARTING
        return ReplicaStatus(
            replica_id=r.replica_id,
            state=state,
            url=r.url,
            host="127.0.0.1",
            labels=dict(r.labels),
            started_at=r.started_at,
            details={"namespace": self.namespace},
        )

    def start(self, spec: ReplicaSpec) -> ReplicaStatus:
        """Bind a server on a free port now; it answers ready after `ready_delay` seconds."""
        replica_id = f"mem-{next(self._ids)}"
        labels = {**spec.labels, DEPLOYMENT_LABEL: spec.deployment}
        replica = _Replica(
            replica_id=replica_id,
            deployment=spec.deployment,
            labels=labels,
            ready_at=time.monotonic() + self.ready_delay,
            started_at=time.time(),
        )
        server = _ReplicaServer(("127.0.0.1", 0), _Handler)
        server.replica = replica
        replica.server = server
        threading.Thread(
            target=server.serve_forever, args=(0.05,), name=replica_id, daemon=True
        ).start()
        replica.log(f"started {replica_id} for {spec.deployment} over {spec.repository.uri}")
        with self._lock:
            self._replicas[replica_id] = replica
        return self._status(replica)

    def status(self, replica_id: str) -> ReplicaStatus:
        """READY once the delay passed, STARTING before, STOPPED if unknown or stopped."""
        replica = self._replicas.get(replica_id)
        if replica is None:
            return ReplicaStatus(replica_id=replica_id, state=ReplicaState.STOPPED)
        return self._status(replica)

    def stop(self, replica_id: str, *, grace: float = 10.0) -> None:
        """Shut the server down and forget the replica; unknown ids are ignored."""
        with self._lock:
            replica = self._replicas.pop(replica_id, None)
        if replica is not None:
            replica.shutdown()

    def logs(self, replica_id: str, *, tail: int = 200) -> str:
        """The requests the replica answered, one line each."""
        replica = self._replicas.get(replica_id)
        return "\n".join(replica.lines[-tail:]) if replica else ""

    def list(self, deployment: str) -> list[ReplicaStatus]:
        """Replicas of `deployment` in this namespace, whichever instance started them."""
        with self._lock:
            replicas = [r for r in self._replicas.values() if r.deployment == deployment]
        return [self._status(r) for r in replicas]

    def preview(self, spec: ReplicaSpec) -> str:
        """A one-line description of what start() would create."""
        return (
            f"in-memory replica of deployment {spec.deployment!r} over {spec.repository.uri} "
            f"(ready after {self.ready_delay} s)"
        )

    @classmethod
    def reset(cls, namespace: str | None = None) -> None:
        """Stop every replica of `namespace` (all namespaces if None): test teardown."""
        with cls._lock:
            names = [namespace] if namespace is not None else list(cls._registry)
            replicas = [r for n in names for r in cls._registry.pop(n, {}).values()]
        for replica in replicas:
            replica.shutdown()


class ManagedMemoryExecutor(MemoryExecutor):
    """A MemoryExecutor that manages replicas itself (like a Kubernetes Deployment): use scale()."""

    manages_replicas: ClassVar[bool] = True

    def scale(self, spec: ReplicaSpec, replicas: int) -> None:
        """Start or stop replicas of `spec.deployment` until `replicas` run."""
        current = sorted(self.list(spec.deployment), key=lambda s: s.replica_id)
        for _ in range(replicas - len(current)):
            self.start(spec)
        for status in current[max(replicas, 0) :]:
            self.stop(status.replica_id)


FAULTS: dict[str, str] = {
    "stop_noop": "stop() does nothing: the replica keeps running and answering",
    "list_drops_labels": "list() reports replicas without their labels",
    "list_all_deployments": "list() ignores the deployment and reports every replica",
    "no_adoption": "state is per instance: a new instance does not see running replicas",
    "start_blocks": "start() waits until the replica is ready and returns READY",
    "unknown_is_failed": "status() of an unknown id says FAILED instead of STOPPED",
    "same_url": "every replica reports the url of the first one",
    "scale_down_ignored": "(managed) scale() adds replicas but never removes any",
}
"""The faults BrokenExecutor can inject, with what each breaks."""


class BrokenExecutor(ManagedMemoryExecutor):
    """A MemoryExecutor that violates the contract in the ways named by `faults` (see FAULTS).

    It manages replicas itself (scale()) only when constructed with `managed=True`.
    """

    manages_replicas: ClassVar[bool] = False

    def __init__(
        self,
        namespace: str = "broken",
        *,
        faults: Iterable[str],
        ready_delay: float = 0.3,
        managed: bool = False,
    ):
        self.manages_replicas = managed  # type: ignore[misc]  (per instance here)
        self.faults = set(faults)
        unknown = self.faults - set(FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {sorted(FAULTS)}")
        if "no_adoption" in self.faults:
            namespace = f"{namespace}-{id(self)}"
        super().__init__(namespace, ready_delay=ready_delay)
        self._first_url: str | None = None

    def _status(self, r: _Replica) -> ReplicaStatus:
        """Fault same_url: report the first replica's url for all."""
        status = super()._status(r)
        if "same_url" in self.faults:
            self._first_url = self._first_url or status.url
            status.url = self._first_url
        return status

    def start(self, spec: ReplicaSpec) -> ReplicaStatus:
        """Fault start_blocks: wait for readiness before returning."""
        status = super().start(spec)
        if "start_blocks" in self.faults:
            time.sleep(self.ready_delay)
            status = self.status(status.replica_id)
        return status

    def status(self, replica_id: str) -> ReplicaStatus:
        """Fault unknown_is_failed: FAILED for ids it does not know."""
        status = super().status(replica_id)
        if "unknown_is_failed" in self.faults and replica_id not in self._replicas:
            status.state = ReplicaState.FAILED
        return status

    def stop(self, replica_id: str, *, grace: float = 10.0) -> None:
        """Fault stop_noop: leave the replica running."""
        if "stop_noop" not in self.faults:
            super().stop(replica_id, grace=grace)

    def list(self, deployment: str) -> list[ReplicaStatus]:
        """Fault list_all_deployments / list_drops_labels."""
        if "list_all_deployments" in self.faults:
            statuses = [self._status(r) for r in list(self._replicas.values())]
        else:
            statuses = super().list(deployment)
        if "list_drops_labels" in self.faults:
            for status in statuses:
                status.labels = {}
        return statuses

    def scale(self, spec: ReplicaSpec, replicas: int) -> None:
        """Fault scale_down_ignored: only ever add replicas."""
        if "scale_down_ignored" in self.faults:
            replicas = max(replicas, len(self.list(spec.deployment)))
        super().scale(spec, replicas)
