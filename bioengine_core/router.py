"""Routes inference requests to ready replicas: least outstanding requests, retry on failure.

Requests travel as KServe v2 HTTP bodies with the binary-tensor extension, rebuilt by
`kserve.InferRequest` with a request id of the router's own that the answer must carry back;
each replica has its own keep-alive connection pool, closed when the replica leaves (an open
keep-alive connection would hold up Triton's shutdown).

Size: one request's whole life (waiting for a replica, the deadline, failover, stall detection)
is kept in one place, so that no path can lose a request between modules.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import tritonclient.http as tc
from tritonclient.utils import np_to_triton_dtype

from .errors import InferenceError, NoReplicaError
from .kserve import HEADER_LEN, InferRequest, ProtocolError, Tensor, check_response
from .upstream import StalledError, Upstream

log = logging.getLogger(__name__)

RETRYABLE = (aiohttp.ClientConnectionError, ConnectionError, OSError)
"""Errors that say the replica failed (connection refused, reset, stalled, protocol anomaly).

Python 3.11's TimeoutError is an OSError: a caller's deadline must never count as a replica
failure, so it is caught before these."""
PASSED_HEADERS = (
    ("content-type", "Content-Type"),
    (HEADER_LEN.lower(), HEADER_LEN),
)
STALL_PROBE = "/v2/health/live"


@dataclass
class Route:
    """A ready replica as the router sees it."""

    replica_id: str
    url: str
    outstanding: int = 0
    requests: int = 0
    failures: int = 0
    draining: bool = False
    stalled: bool = False
    added_at: float = field(default_factory=time.monotonic)
    last_answer: float = field(default_factory=time.monotonic)
    upstream: Upstream | None = None
    inflight: dict[int, float] = field(default_factory=dict)
    """Start time (monotonic) of each request in flight, by a request counter."""

    def client(self) -> Upstream:
        """This replica's keep-alive connection pool."""
        if self.upstream is None:
            parsed = urlsplit(self.url)
            self.upstream = Upstream(parsed.hostname or "127.0.0.1", parsed.port or 80)
        return self.upstream

    async def close(self) -> None:
        """Close the replica's connections."""
        if self.upstream is not None:
            self.upstream.close()


class Router:
    """Picks a ready replica per request and retries elsewhere when a replica fails.

    A caller's deadline bounds everything a request does (waiting for a replica, retries) and
    its expiry says nothing about the replica. A replica that stops answering is found by a
    watchdog (requests older than `stall_after` and no answer since: probe its liveness on a
    fresh connection); its requests in flight are then resent to another replica.
    """

    def __init__(
        self,
        *,
        retries: int = 3,
        wait_for_replica: float = 30.0,
        stall_after: float = 3.0,
        probe_timeout: float = 2.0,
    ):
        self.routes: dict[str, Route] = {}
        self.retries = retries
        self.wait_for_replica = wait_for_replica
        self.stall_after = stall_after
        self.probe_timeout = probe_timeout
        self._session: aiohttp.ClientSession | None = None
        self._changed = asyncio.Event()
        self._watchdog: asyncio.Task | None = None
        self._counter = 0
        self._fastest: dict[str, deque[float]] = {}
        self.on_replica_error: list = []  # callbacks(replica_id) when a replica fails a request
        self.waiting = 0  # requests waiting for a ready replica (an autoscaler's cue)
        self.last_request: float | None = None  # monotonic time of the last request
        self.on_wait: list[Callable[[], None]] = []  # called when a request finds no replica
        self.why_none: Callable[[], str] = lambda: ""  # what the replicas are doing, in words
        self.stalls = 0
        self.deadline_rejections = 0

    async def session(self) -> aiohttp.ClientSession:
        """A session for control requests (model load/unload), not for inference."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=256, limit_per_host=64, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        return self._session

    async def close(self) -> None:
        """Close every HTTP session and stop the watchdog."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._session is not None:
            await self._session.close()
        for route in list(self.routes.values()):
            await route.close()

    # -------------------------------------------------------------- membership
    def add(self, replica_id: str, url: str) -> None:
        """Route requests to a ready replica."""
        route = self.routes.get(replica_id)
        if route is None:
            self.routes[replica_id] = Route(replica_id, url.rstrip("/"))
            log.info("routing to replica %s at %s", replica_id, url)
        else:
            route.draining = False
            route.stalled = False
            route.last_answer = time.monotonic()
        self._changed.set()

    async def release(self, replica_id: str) -> None:
        """Stop routing to a replica and close its connections (call once it is idle)."""
        route = self.routes.pop(replica_id, None)
        if route is not None:
            await route.close()

    def drain(self, replica_id: str) -> None:
        """Send no new requests to a replica, but keep it for the ones in flight."""
        route = self.routes.get(replica_id)
        if route:
            route.draining = True

    async def wait_idle(self, replica_id: str, timeout: float) -> int:
        """Wait until a draining replica has no request in flight (or timeout); returns how
        many were still in flight (0 when it drained)."""
        deadline = time.monotonic() + timeout
        while True:
            route = self.routes.get(replica_id)
            if route is None or route.outstanding == 0:
                return 0
            if time.monotonic() >= deadline:
                return route.outstanding
            await asyncio.sleep(0.05)

    def ready_count(self) -> int:
        """Number of replicas accepting new requests."""
        return sum(1 for r in self.routes.values() if not r.draining)

    async def _pick(self, exclude: set[str], deadline: float) -> Route:
        self.waiting += 1
        try:
            return await self._wait_pick(exclude, deadline)
        finally:
            self.waiting -= 1

    async def _wait_pick(self, exclude: set[str], deadline: float) -> Route:
        woke = False
        while True:
            candidates = [
                r for r in self.routes.values() if not r.draining and r.replica_id not in exclude
            ]
            if not candidates and exclude:
                # every replica failed once: allow another round on the survivors
                candidates = [r for r in self.routes.values() if not r.draining]
            if candidates:
                return min(candidates, key=lambda r: (r.outstanding, r.requests))
            if not woke:  # an autoscaler may start a replica for this request now
                woke = True
                for callback in self.on_wait:
                    callback()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                why = self.why_none()
                raise NoReplicaError(
                    "no ready replica is available ("
                    + (why or "the service is starting or every replica failed")
                    + "); try again shortly"
                )
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 0.5))
            except TimeoutError:
                pass

    # -------------------------------------------------------------- stalls
    def _ensure_watchdog(self) -> None:
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.get_running_loop().create_task(
                self._watch(), name="bioengine-router-watchdog"
            )

    async def _watch(self) -> None:
        interval = max(0.1, min(0.5, self.stall_after / 4))
        probing: dict[str, asyncio.Task] = {}
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for route in list(self.routes.values()):
                if route.stalled or not route.inflight or route.replica_id in probing:
                    continue
                oldest = min(route.inflight.values())
                if now - oldest > self.stall_after and now - route.last_answer > self.stall_after:
                    probing[route.replica_id] = asyncio.create_task(self._probe(route))
            for rid, task in list(probing.items()):
                if task.done():
                    probing.pop(rid)

    async def _probe(self, route: Route) -> None:
        """Ask a quiet replica whether it is alive (fresh connection); abort its requests if not."""
        probe = Upstream(*route.client().host_port())
        try:
            status, _, _ = await probe.request("GET", STALL_PROBE, timeout=self.probe_timeout)
            if status == 200:
                return
            why = f"liveness answered {status}"
        except TimeoutError:
            why = f"no liveness answer in {self.probe_timeout:g} s"
        except (ConnectionError, OSError) as exc:
            why = f"liveness probe failed: {exc}"
        finally:
            probe.close()
        if route.replica_id not in self.routes or route.stalled:
            return
        route.stalled = True
        route.draining = True
        self.stalls += 1
        aborted = route.client().abort(f"replica {route.replica_id} stalled ({why})")
        log.warning(
            "replica %s stopped answering (%s): %d request(s) resent to other replicas",
            route.replica_id,
            why,
            aborted,
        )
        for callback in self.on_replica_error:
            callback(route.replica_id)

    # -------------------------------------------------------------- requests
    def hopeless(self, path: str, remaining: float) -> bool:
        """True when no recent answer for `path` came back within `remaining` seconds."""
        seen = self._fastest.get(path)
        if seen and len(seen) >= 3 and remaining < min(seen):
            self.deadline_rejections += 1
            return True
        return False

    def _record(self, key: str, elapsed: float) -> None:
        seen = self._fastest.get(key)
        if seen is None:
            if len(self._fastest) > 1024:
                self._fastest.clear()
            seen = self._fastest[key] = deque(maxlen=64)
        seen.append(elapsed)

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | list[bytes | memoryview] | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 60.0,
        verify: Callable[[int, bytes, dict[str, str]], tuple[bytes, dict[str, str]]] | None = None,
    ) -> tuple[int, bytes, dict[str, str]]:
        """Send one request to a ready replica within `timeout`, failing over on replica errors.

        `verify(status, body, headers)` checks a 200 answer (raising ProtocolError when it does
        not belong to the request) and may rewrite it. InferenceError(504) when the caller's
        deadline passes; NoReplicaError(503) when no replica could answer.
        """
        started = time.monotonic()
        self.last_request = started
        deadline = started + timeout
        tried: set[str] = set()
        last: Exception | None = None
        self._ensure_watchdog()
        # replicas are local hops: never pay for compression, and pass bodies through unchanged
        headers = {**(headers or {}), "Accept-Encoding": "identity"}
        for _ in range(self.retries + 1):
            try:
                route = await self._pick(tried, min(deadline, started + self.wait_for_replica))
            except NoReplicaError as exc:
                if time.monotonic() >= deadline:
                    waited = self._timed_out(timeout)
                    raise InferenceError(
                        f"{waited}, waiting for a replica: {exc}", status=504
                    ) from None
                raise
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.hopeless(path, remaining):
                # an answer cannot come in time: do not make a replica compute it for nobody
                raise self._timed_out(timeout)
            self._counter += 1
            ticket = self._counter
            route.outstanding += 1
            route.requests += 1
            route.inflight[ticket] = time.monotonic()
            try:
                sent = time.monotonic()
                status, data, got = await route.client().request(
                    method, path, body=body, headers=headers, timeout=remaining
                )
                route.last_answer = time.monotonic()
                if _replica_unwell(status, data):
                    raise ConnectionError(f"replica {route.replica_id} not ready")
                out_headers = {name: got[key] for key, name in PASSED_HEADERS if key in got}
                if status == 200 and verify is not None:
                    data, out_headers = verify(status, data, got)
                if status == 200:
                    self._record(path, route.last_answer - sent)
                return status, data, out_headers
            except TimeoutError:
                raise self._timed_out(timeout) from None
            except RETRYABLE as exc:
                last = exc
                route.failures += 1
                if isinstance(exc, ProtocolError):
                    route.client().close()  # the connection that answered wrongly is pooled
                tried.add(route.replica_id)
                log.warning(
                    "replica %s failed a request (%s); retrying elsewhere", route.replica_id, exc
                )
                if not isinstance(exc, StalledError):  # the watchdog reported that one already
                    for callback in self.on_replica_error:
                        callback(route.replica_id)
            finally:
                route.outstanding -= 1
                route.inflight.pop(ticket, None)
        raise NoReplicaError(f"request failed on {len(tried)} replica(s): {last}")

    @staticmethod
    def _timed_out(timeout: float) -> InferenceError:
        return InferenceError(
            f"request timed out after {timeout:g} s (the caller's deadline)", status=504
        )

    async def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        outputs: list[str],
        *,
        timeout: float = 60.0,
        weights_only: bool = False,
    ) -> dict[str, np.ndarray]:
        """Run a Triton model on numpy inputs with binary tensors; returns numpy outputs
        (`weights_only`: the generated model skips processing, for a preprocessed tile)."""
        tensors = []
        for name, array in inputs.items():
            arr = np.ascontiguousarray(array)
            tensors.append(
                Tensor(
                    name, list(arr.shape), np_to_triton_dtype(arr.dtype), memoryview(arr).cast("B")
                )
            )
        request = InferRequest(
            model, tensors, [(name, True) for name in outputs], weights_only=weights_only
        )
        parts, headers = request.build()

        def verify(status: int, data: bytes, got: dict[str, str]) -> tuple[bytes, dict[str, str]]:
            return check_response(request, status, data, got)

        status, data, out_headers = await self.request(
            "POST",
            f"/v2/models/{model}/infer",
            body=parts,
            headers=headers,
            timeout=timeout,
            verify=verify,
        )
        if status != 200:
            raise InferenceError(error_message(data) or f"HTTP {status}", status=status)
        header_length = out_headers.get(HEADER_LEN)
        result = tc.InferenceServerClient.parse_response_body(
            data, header_length=int(header_length) if header_length else None
        )
        return {name: result.as_numpy(name) for name in outputs}


def _replica_unwell(status: int, data: bytes) -> bool:
    """An answer that says the replica (not the request) is broken: worth another replica."""
    if status not in (500, 502, 503):
        return False
    text = data[:2000].lower()
    return b"not ready" in text or b"is not healthy" in text or b"stub process" in text


def error_message(data: bytes) -> str:
    """The `error` field of a Triton JSON error body, or the raw text."""
    try:
        return str(json.loads(data).get("error", ""))
    except (ValueError, AttributeError):
        return data.decode(errors="replace")[:500]
