"""The direct path for large arrays: HTTP POST of .npz bodies, authorised by tickets from Hypha.

Hypha RPC moves about 8-10 MB/s here (chunked messages relayed by the server), which dominates
inference for 512x512 images and larger. A caller first asks the Hypha service for a ticket
(`get_direct_access()`, cheap, authorised by Hypha's visibility rules) and then sends tensors
straight to this endpoint; `bioengine_gateway_hypha.client` does both and falls back to RPC.
"""

from __future__ import annotations

import io
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from aiohttp import web

from bioengine_core.errors import InferenceError

log = logging.getLogger("bioengine.gateway.hypha")

TICKET_HEADER = "Authorization"


def pack_arrays(arrays: dict[str, np.ndarray] | list[np.ndarray]) -> bytes:
    """Arrays as an uncompressed .npz (positional lists keyed "0", "1", ...)."""
    if isinstance(arrays, (list, tuple)):
        named = {f"__pos_{i}": np.asarray(a) for i, a in enumerate(arrays)}
    else:
        named = {str(k): np.asarray(v) for k, v in arrays.items()}
    buf = io.BytesIO()
    np.savez(buf, **named)
    return buf.getvalue()


def unpack_arrays(data: bytes) -> dict[str, np.ndarray] | list[np.ndarray]:
    """Inverse of `pack_arrays` (no pickles accepted)."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        named = {k: npz[k] for k in npz.files}
    if named and all(k.startswith("__pos_") for k in named):
        return [named[f"__pos_{i}"] for i in range(len(named))]
    return named


class Tickets:
    """Short-lived bearer tickets handed out through the (authorised) Hypha service."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self._tickets: dict[str, tuple[float, str]] = {}

    def issue(self, user: str) -> tuple[str, float]:
        """A new ticket for `user` and its expiry (wall-clock seconds)."""
        now = time.time()
        self._tickets = {t: v for t, v in self._tickets.items() if v[0] > now}
        ticket = secrets.token_urlsafe(24)
        expires = now + self.ttl
        self._tickets[ticket] = (expires, user)
        return ticket, expires

    def check(self, ticket: str) -> str | None:
        """The user a valid ticket was issued to, or None."""
        entry = self._tickets.get(ticket)
        if entry is None or entry[0] < time.time():
            return None
        return entry[1]


InferFn = Callable[..., Awaitable[dict[str, np.ndarray]]]


class DirectServer:
    """aiohttp server with one route: POST /v1/infer/{model_id} (.npz in, .npz out)."""

    def __init__(self, infer: InferFn, tickets: Tickets, *, host: str, port: int) -> None:
        self._infer = infer
        self.tickets = tickets
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Bind and serve."""
        app = web.Application(client_max_size=1024**3)
        app.router.add_post("/v1/infer/{model_id}", self._handle)
        app.router.add_get("/health", self._health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        if sockets:
            self.port = int(sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """Where this server listens, as this host reaches it."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        """Stop serving. Idempotent."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def _handle(self, request: web.Request) -> web.Response:
        header = request.headers.get(TICKET_HEADER, "")
        ticket = header[7:] if header.lower().startswith("bearer ") else ""
        user = self.tickets.check(ticket) if ticket else None
        if user is None:
            return web.json_response(
                {"error": "missing or expired ticket; ask the Hypha service's get_direct_access()"},
                status=401,
            )
        model_id = request.match_info["model_id"]
        timeout = request.query.get("timeout")
        try:
            inputs = unpack_arrays(await request.read())
        except Exception as exc:  # a malformed body is the client's error
            return web.json_response({"error": f"body is not a valid .npz: {exc}"}, status=400)
        try:
            outputs = await self._infer(
                model_id, inputs, timeout=float(timeout) if timeout else None
            )
        except InferenceError as exc:
            return web.json_response(
                {"error": str(exc), "type": type(exc).__name__}, status=exc.status
            )
        except Exception as exc:
            log.warning("direct infer of %s failed: %s", model_id, exc)
            return web.json_response({"error": str(exc), "type": type(exc).__name__}, status=500)
        return web.Response(body=pack_arrays(outputs), content_type="application/x-npz")


def ticket_payload(url: str, ticket: str, expires: float) -> dict[str, Any]:
    """What `get_direct_access()` returns to a caller."""
    return {"url": url, "ticket": ticket, "expires_at": expires, "protocol": "npz-v1"}
