"""The direct path for large arrays: HTTP POST of .npz bodies, authorised by tickets from Hypha.

Hypha RPC moves about 8-10 MB/s here (chunked messages relayed by the server), which dominates
inference for 512x512 images and larger. A caller first asks the Hypha service for a ticket
(`get_direct_access()`, cheap, authorised by Hypha's visibility rules) and then sends tensors
straight to this endpoint; `bioengine_gateway_hypha.client` does both and falls back to RPC.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
from aiohttp import HttpVersion11, hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

from bioengine_core.util import connect_host, url_host

from .errors import public_error
from .npz import MAX_MEMBERS, NpzRefused, inspect_npz, read_arrays

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
    """Inverse of `pack_arrays`, for the client reading answers (no pickles accepted); the
    server reads requests with the checks of `npz.inspect_npz` instead."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        named = {k: npz[k] for k in npz.files}
    if named and all(k.startswith("__pos_") for k in named):
        return [named[f"__pos_{i}"] for i in range(len(named))]
    return named


class Tickets:
    """Short-lived bearer tickets handed out through the (authorised) Hypha service.

    At most `max_tickets` are held: a caller asking for tickets in a loop evicts the oldest
    ones instead of growing the gateway's memory.
    """

    def __init__(self, ttl: float, *, max_tickets: int = 10_000) -> None:
        self.ttl = ttl
        self.max_tickets = max_tickets
        self._tickets: dict[str, tuple[float, str]] = {}

    def issue(self, user: str) -> tuple[str, float]:
        """A new ticket for `user` and its expiry (wall-clock seconds)."""
        now = time.time()
        # Insertion order is expiry order (one ttl): expired and surplus ones are at the front.
        for old, (expires, _) in list(self._tickets.items()):
            if expires > now and len(self._tickets) < self.max_tickets:
                break
            del self._tickets[old]
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
Spec = tuple[tuple[int, ...], str]
CheckFn = Callable[[str, "dict[str, Spec] | list[Spec]"], None]
ModelFn = Callable[[str], object]

MiB = 1024 * 1024


@dataclass(frozen=True)
class DirectLimits:
    """What one request on the direct path may cost: body size, time to send it, arrays."""

    max_request_bytes: int = 512 * MiB
    read_timeout: float = 30.0
    body_timeout: float = 300.0
    max_members: int = MAX_MEMBERS


class Refused(Exception):
    """A request answered with a 4xx before it reached the service."""

    def __init__(self, status: int, message: str, *, close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.close = close  # drop the connection: the rest of the body is not wanted


async def _refusal(
    request: web.Request, status: int, message: str, *, close: bool = False
) -> web.StreamResponse:
    """A JSON error answer; with `close`, sent at once and the connection dropped (no
    lingering to read the rest of a body that is not wanted)."""
    response = web.json_response({"error": message, "type": "RequestRefused"}, status=status)
    if close:
        response.force_close()
        try:
            await response.prepare(request)
            await response.write_eof()
        except ConnectionError:
            pass  # the client is gone already
        request.protocol.force_close()
    return response


class DirectServer:
    """aiohttp server with one route: POST /v1/infer/{model_id} (.npz in, .npz out).

    Every limit is enforced before the body is buffered: ticket, Content-Encoding, declared
    Content-Length, the model's existence; then the body is read with a size cap and
    timeouts, and the .npz is checked (names, sizes, headers, shapes) before it is inflated.
    """

    def __init__(
        self,
        infer: InferFn,
        tickets: Tickets,
        *,
        host: str,
        port: int,
        check_inputs: CheckFn | None = None,
        model_exists: ModelFn | None = None,
        limits: DirectLimits | None = None,
    ) -> None:
        self._infer = infer
        self._check_inputs = check_inputs
        self._model_exists = model_exists
        self.tickets = tickets
        self.host = host
        self.port = port
        self.limits = limits or DirectLimits()
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        """Bind and serve (request bodies are never decompressed by aiohttp)."""
        app = web.Application(client_max_size=self.limits.max_request_bytes)
        app.router.add_post("/v1/infer/{model_id}", self._handle, expect_handler=self._expect)
        app.router.add_get("/health", self._health)
        # keepalive_timeout runs from the moment a connection opens (aiohttp >= 3.10): a
        # client that never completes its request headers is closed after it
        self._runner = web.AppRunner(
            app,
            access_log=None,
            auto_decompress=False,
            lingering_time=5.0,
            keepalive_timeout=self.limits.read_timeout,
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        if sockets:
            self.port = int(sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """Where this server listens, as this host reaches it."""
        return f"http://{url_host(connect_host(self.host))}:{self.port}"

    async def stop(self) -> None:
        """Stop serving. Idempotent."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    def _precheck(self, request: web.Request) -> None:
        """Refuse on the headers alone: ticket, encoding, declared size, unknown model."""
        header = request.headers.get(TICKET_HEADER, "")
        ticket = header[7:] if header.lower().startswith("bearer ") else ""
        if not ticket or self.tickets.check(ticket) is None:
            raise Refused(
                401, "missing or expired ticket; ask the Hypha service's get_direct_access()"
            )
        encoding = request.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
        if encoding not in ("", "identity"):
            raise Refused(
                415, f"Content-Encoding {encoding[:40]!r} is not accepted: send the .npz as is"
            )
        limit = self.limits.max_request_bytes
        declared = request.headers.get(hdrs.CONTENT_LENGTH)
        if declared is not None:
            if not declared.strip().isdigit():
                raise Refused(400, "invalid Content-Length")
            if int(declared) > limit:
                raise Refused(
                    413,
                    f"request body of {int(declared)} bytes is larger than the limit of "
                    f"{limit} bytes (direct_max_request_bytes)",
                    close=True,
                )
        if self._model_exists is not None:
            self._model_exists(request.match_info["model_id"])  # ModelNotFoundError -> 404

    async def _expect(self, request: web.Request) -> web.StreamResponse | None:
        """`Expect: 100-continue`: refuse before the client sends the body, else continue."""
        try:
            self._precheck(request)
        except Refused as exc:
            return await _refusal(request, exc.status, str(exc), close=True)
        except Exception as exc:
            public = public_error(exc, where="direct path")
            return await _refusal(request, public.status, public.text, close=True)
        expect = request.headers.get(hdrs.EXPECT, "").lower()
        if request.version != HttpVersion11 or expect != "100-continue":
            return await _refusal(request, 417, f"unknown Expect: {expect[:40]}", close=True)
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0
        return None

    async def _read_body(self, request: web.Request) -> io.BytesIO:
        """The body, counted while it streams in: 413 past the limit, 408 when too slow."""
        limit = self.limits.max_request_bytes
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.body_timeout
        body = io.BytesIO()
        size = 0
        while True:
            wait = min(self.limits.read_timeout, deadline - loop.time())
            try:
                if wait <= 0:
                    raise TimeoutError
                chunk = await asyncio.wait_for(request.content.readany(), wait)
            except TimeoutError:
                raise Refused(
                    408,
                    f"request body not received in time (after {size} bytes; "
                    f"direct_read_timeout {self.limits.read_timeout:g} s, "
                    f"direct_body_timeout {self.limits.body_timeout:g} s)",
                    close=True,
                ) from None
            except (ConnectionError, aiohttp.ClientError, HttpProcessingError) as exc:
                raise Refused(400, f"request body incomplete: {exc}", close=True) from None
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise Refused(
                    413,
                    f"request body larger than the limit of {limit} bytes "
                    "(direct_max_request_bytes)",
                    close=True,
                )
            body.write(chunk)
        body.seek(0)
        return body

    async def _decode(
        self, model_id: str, body: io.BytesIO
    ) -> dict[str, np.ndarray] | list[np.ndarray]:
        """Check the archive and the declared shapes against the model, then read the arrays
        (in a worker thread: inflating and copying large arrays would stall the event loop)."""
        zf, members = inspect_npz(
            body, max_bytes=self.limits.max_request_bytes, max_members=self.limits.max_members
        )
        with zf:
            positional = [m.name.startswith("__pos_") for m in members]
            if any(positional) and not all(positional):
                raise NpzRefused("mix of named and positional (__pos_N) arrays")
            if all(positional):
                by_index = {m.name[6:]: m for m in members}
                wanted = [str(i) for i in range(len(members))]
                if sorted(by_index) != sorted(wanted):
                    raise NpzRefused("positional arrays must be named __pos_0 ... __pos_N")
                members = [by_index[i] for i in wanted]
                specs: Any = [(m.shape, m.dtype.name) for m in members]
            else:
                specs = {m.name: (m.shape, m.dtype.name) for m in members}
            if self._check_inputs is not None:
                self._check_inputs(model_id, specs)
            arrays = await asyncio.to_thread(read_arrays, zf, members)
        if all(positional):
            return [arrays[m.name] for m in members]
        return arrays

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        model_id = request.match_info["model_id"]
        try:
            self._precheck(request)
            timeout = _timeout_param(request.query.get("timeout"))
            inputs = await self._decode(model_id, await self._read_body(request))
            outputs = await self._infer(model_id, inputs, timeout=timeout)
            body = await asyncio.to_thread(pack_arrays, outputs)
        except Refused as exc:
            return await _refusal(request, exc.status, str(exc), close=exc.close)
        except NpzRefused as exc:
            return await _refusal(request, exc.status, f"body is not an acceptable .npz: {exc}")
        except Exception as exc:
            public = public_error(exc, where=f"direct infer of {model_id[:100]!r}")
            return web.json_response(
                {"error": public.text, "type": public.kind}, status=public.status
            )
        return web.Response(body=body, content_type="application/x-npz")


def _timeout_param(value: str | None) -> float | None:
    """The `?timeout=` query parameter: None, or positive finite seconds (else 400)."""
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise Refused(400, f"timeout must be a positive number of seconds, not {value[:40]!r}")
    return seconds


def ticket_payload(url: str, ticket: str, expires: float) -> dict[str, Any]:
    """What `get_direct_access()` returns to a caller."""
    return {"url": url, "ticket": ticket, "expires_at": expires, "protocol": "npz-v1"}
