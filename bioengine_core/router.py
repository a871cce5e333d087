"""Routes inference requests to ready replicas: least outstanding requests, retry on failure.

Requests travel as KServe v2 HTTP bodies with the binary-tensor extension, built and parsed
with tritonclient; each replica has its own keep-alive connection pool, closed when the replica
leaves (an open keep-alive connection would hold up Triton's shutdown).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import tritonclient.http as tc
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from .errors import InferenceError, InvalidInputError, NoReplicaError
from .upstream import Upstream

log = logging.getLogger(__name__)

HEADER_LEN = "Inference-Header-Content-Length"
RETRYABLE = (aiohttp.ClientConnectionError, ConnectionError, OSError)
PASSED_HEADERS = (
    ("content-type", "Content-Type"),
    ("content-encoding", "Content-Encoding"),
    (HEADER_LEN.lower(), HEADER_LEN),
)


@dataclass
class Route:
    """A ready replica as the router sees it."""

    replica_id: str
    url: str
    outstanding: int = 0
    requests: int = 0
    failures: int = 0
    draining: bool = False
    added_at: float = field(default_factory=time.monotonic)
    upstream: Upstream | None = None

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
    """Picks a ready replica per request and retries elsewhere when a replica fails."""

    def __init__(self, *, retries: int = 3, wait_for_replica: float = 30.0):
        self.routes: dict[str, Route] = {}
        self.retries = retries
        self.wait_for_replica = wait_for_replica
        self._session: aiohttp.ClientSession | None = None
        self._changed = asyncio.Event()
        self.on_replica_error: list = []  # callbacks(replica_id) when a replica fails a request

    async def session(self) -> aiohttp.ClientSession:
        """A session for control requests (model load/unload), not for inference."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=256, limit_per_host=64, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        return self._session

    async def close(self) -> None:
        """Close every HTTP session."""
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

    async def wait_idle(self, replica_id: str, timeout: float) -> None:
        """Wait until a draining replica has no request in flight (or timeout)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            route = self.routes.get(replica_id)
            if route is None or route.outstanding == 0:
                return
            await asyncio.sleep(0.05)

    def ready_count(self) -> int:
        """Number of replicas accepting new requests."""
        return sum(1 for r in self.routes.values() if not r.draining)

    async def _pick(self, exclude: set[str], deadline: float) -> Route:
        while True:
            candidates = [
                r for r in self.routes.values() if not r.draining and r.replica_id not in exclude
            ]
            if not candidates and exclude:
                # every replica failed once: allow another round on the survivors
                candidates = [r for r in self.routes.values() if not r.draining]
            if candidates:
                return min(candidates, key=lambda r: (r.outstanding, r.requests))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise NoReplicaError(
                    "no ready replica is available (the service is starting "
                    "or every replica failed); try again shortly"
                )
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 0.5))
            except TimeoutError:
                pass

    # -------------------------------------------------------------- requests
    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 60.0,
    ) -> tuple[int, bytes, dict[str, str]]:
        """Send one HTTP request to a ready replica, failing over on connection errors."""
        deadline = time.monotonic() + max(timeout, self.wait_for_replica)
        tried: set[str] = set()
        last: Exception | None = None
        # replicas are local hops: never pay for compression, and pass bodies through unchanged
        headers = {**(headers or {}), "Accept-Encoding": "identity"}
        for _ in range(self.retries + 1):
            route = await self._pick(tried, deadline)
            route.outstanding += 1
            route.requests += 1
            try:
                status, data, got = await route.client().request(
                    method, path, body=body, headers=headers, timeout=timeout
                )
                if status in (502, 503) and b"not ready" in data.lower():
                    raise ConnectionError(f"replica {route.replica_id} not ready")
                out_headers = {name: got[key] for key, name in PASSED_HEADERS if key in got}
                return status, data, out_headers
            except RETRYABLE as exc:
                last = exc
                route.failures += 1
                tried.add(route.replica_id)
                log.warning(
                    "replica %s failed a request (%s); retrying elsewhere", route.replica_id, exc
                )
                for callback in self.on_replica_error:
                    callback(route.replica_id)
            except TimeoutError:
                raise InferenceError(f"request timed out after {timeout} s", status=504) from None
            finally:
                route.outstanding -= 1
        raise NoReplicaError(f"request failed on {len(tried)} replica(s): {last}")

    async def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        outputs: list[str],
        *,
        timeout: float = 60.0,
    ) -> dict[str, np.ndarray]:
        """Run a Triton model on numpy inputs with binary tensors; returns numpy outputs."""
        infer_inputs = []
        for name, array in inputs.items():
            arr = np.ascontiguousarray(array)
            item = tc.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
            item.set_data_from_numpy(arr, binary_data=True)
            infer_inputs.append(item)
        requested = [tc.InferRequestedOutput(name, binary_data=True) for name in outputs]
        body, json_size = tc.InferenceServerClient.generate_request_body(infer_inputs, requested)
        headers = {"Content-Type": "application/octet-stream"}
        if json_size is not None:
            headers[HEADER_LEN] = str(json_size)
        status, data, out_headers = await self.request(
            "POST", f"/v2/models/{model}/infer", body=body, headers=headers, timeout=timeout
        )
        if status != 200:
            raise InferenceError(error_message(data) or f"HTTP {status}", status=status)
        header_length = out_headers.get(HEADER_LEN) or out_headers.get(HEADER_LEN.lower())
        result = tc.InferenceServerClient.parse_response_body(
            data, header_length=int(header_length) if header_length else None
        )
        return {name: result.as_numpy(name) for name in outputs}


def error_message(data: bytes) -> str:
    """The `error` field of a Triton JSON error body, or the raw text."""
    try:
        return str(json.loads(data).get("error", ""))
    except (ValueError, AttributeError):
        return data.decode(errors="replace")[:500]


def _placeholder(shape: list[int], dtype: np.dtype) -> np.ndarray:
    """An array of the given shape and dtype that allocates one element (for validation)."""
    return np.lib.stride_tricks.as_strided(
        np.zeros(1, dtype=dtype), shape=tuple(shape), strides=(0,) * len(shape)
    )


def check_infer_request(
    package: Any, model_id: str, body: bytes, header_length: str | None
) -> None:
    """Validate a KServe v2 infer request's inputs (JSON header only) against the model's package.

    Raises InvalidInputError naming the model and tensor; binary tensor data is never decoded.
    """
    from .modelpkg import validate_inputs

    try:
        size = int(header_length) if header_length else len(body)
        header = json.loads(body[:size])
        inputs = header["inputs"]
        arrays = {}
        for item in inputs:
            name, shape, datatype = item["name"], item["shape"], item["datatype"]
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise InvalidInputError(
                    f"model '{model_id}' input '{name}': shape must be a list of sizes"
                )
            dtype = triton_to_np_dtype(datatype)
            if dtype is None:
                raise InvalidInputError(
                    f"model '{model_id}' input '{name}': unknown datatype {datatype!r}"
                )
            arrays[name] = _placeholder(shape, np.dtype(dtype))
    except InvalidInputError:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise InvalidInputError(
            f"malformed inference request for model '{model_id}': {type(exc).__name__}: {exc}"
        ) from None
    validate_inputs(package, arrays)
