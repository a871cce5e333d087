"""Client helper: the same `infer` call as the Hypha service, with large arrays sent directly.

    from bioengine_gateway_hypha.client import connect
    engine = await connect("http://127.0.0.1:9527", "bioengine/bioengine")
    outputs = await engine.infer("unet2d-nuclei-broad", {"input0": image})

Everything else (`list_models`, `test`, `status`, ...) is the Hypha service itself. When the
direct path is unreachable (a BioEngine behind a firewall in proxy mode), `infer` falls back to
Hypha RPC and stays there; `connect` opens that RPC connection without WebSocket deflate.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
import numpy as np

from .direct import pack_arrays, unpack_arrays
from .wsopts import websocket_compression

log = logging.getLogger("bioengine.gateway.hypha.client")

DIRECT_MIN_BYTES = 256 * 1024
"""Below this many input bytes RPC is as fast as HTTP; the direct path is used above it."""


def _nbytes(inputs: Any) -> int:
    if isinstance(inputs, dict):
        return sum(np.asarray(v).nbytes for v in inputs.values())
    if isinstance(inputs, (list, tuple)):
        return sum(np.asarray(v).nbytes for v in inputs)
    return int(np.asarray(inputs).nbytes)


class RemoteInferenceError(RuntimeError):
    """The direct path answered with an error (unknown model, invalid inputs, ...)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class BioEngineClient:
    """Wraps the Hypha `bioengine-model-runner` service; `infer` prefers the direct path."""

    def __init__(self, service: Any, *, direct: bool = True, server: Any = None) -> None:
        self.service = service
        self.server = server
        self.direct = direct
        self._access: dict[str, Any] | None = None
        self._session: aiohttp.ClientSession | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.service, name)

    async def _ticket(self) -> dict[str, Any] | None:
        access = self._access
        if access is None or access.get("expires_at", 0) - 30 < time.time():
            access = await self.service.get_direct_access()
            self._access = access
        return access

    async def infer(
        self, model_id: str, inputs: Any, *, timeout: float | None = None, **kwargs: Any
    ) -> dict[str, np.ndarray]:
        """Run a model; tensors travel over the direct HTTP path when it is reachable."""
        if self.direct and _nbytes(inputs) >= DIRECT_MIN_BYTES:
            try:
                return await self._infer_direct(model_id, inputs, timeout)
            except RemoteInferenceError:
                raise
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                log.info("direct path unreachable (%s); using Hypha RPC", exc)
                self.direct = False
        if timeout is not None:
            kwargs["timeout"] = timeout
        return await self.service.infer(model_id, inputs, **kwargs)

    async def _infer_direct(
        self, model_id: str, inputs: Any, timeout: float | None
    ) -> dict[str, np.ndarray]:
        if isinstance(inputs, np.ndarray):
            inputs = [inputs]
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=None, connect=5)
            )
        body = pack_arrays(inputs)
        params = {"timeout": str(timeout)} if timeout else None
        for attempt in (1, 2):
            access = await self._ticket()
            if not access:
                raise OSError("direct path disabled by the operator")
            async with self._session.post(
                f"{access['url']}/v1/infer/{model_id}",
                data=body,
                params=params,
                headers={"Authorization": f"Bearer {access['ticket']}"},
            ) as resp:
                data = await resp.read()
                if resp.status == 401 and attempt == 1:
                    self._access = None  # expired, or the gateway restarted: new ticket
                    continue
                if resp.status != 200:
                    try:
                        message = (await resp.json(content_type=None)).get("error", "")
                    except Exception:
                        message = data[:200].decode(errors="replace")
                    raise RemoteInferenceError(message, resp.status)
            outputs = unpack_arrays(data)
            return outputs if isinstance(outputs, dict) else dict(enumerate(outputs))  # type: ignore
        raise AssertionError("unreachable")  # pragma: no cover

    async def close(self) -> None:
        """Close the HTTP session and, if `connect` opened it, the Hypha connection."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self.server is not None:
            await self.server.disconnect()
            self.server = None


async def connect(
    server_url: str,
    service_id: str = "bioengine/bioengine",
    *,
    token: str | None = None,
    direct: bool = True,
    compression: bool = False,
    **config: Any,
) -> BioEngineClient:
    """Connect to Hypha and return a BioEngineClient for the `bioengine-model-runner` service.

    `compression=False` (default) connects without WebSocket deflate: image tensors do not
    compress, and with the gateway doing the same the whole RPC path is uncompressed even on a
    stock Hypha server (several times faster for large arrays).
    """
    from hypha_rpc import connect_to_server

    options: dict[str, Any] = {"server_url": server_url, **config}
    if token:
        options["token"] = token
    with websocket_compression(compression):
        server = await connect_to_server(options)
    service = await server.get_service(service_id)
    return BioEngineClient(service, direct=direct, server=server)
