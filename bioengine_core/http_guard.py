"""What the HTTP gateway puts between a client and the engine: connection and body limits,
a memory budget for bodies in flight, and API tokens.

Bodies are limited before they are read (declared size), held within a budget shared by all
requests, and read within a deadline; compressed bodies are refused unread. Tokens are kept as
digests and compared in constant time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .contracts import BackendContext
from .errors import ConfigError, InferenceError
from .gateway_http import HttpGatewaySettings
from .kserve import HEADER_LEN

CHUNK = 1 << 20
RANK = {None: 0, "inference": 1, "admin": 2}
"""Roles in order of what they may do."""


def error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    """A JSON error answer: `{"error": message}`."""
    return web.json_response({"error": message}, status=status, headers=headers)


class BodyBudget:
    """Bytes of request bodies held at once, over all requests; waits, then refuses."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        self._released = asyncio.Event()

    async def acquire(self, size: int, wait: float) -> bool:
        """Reserve `size` bytes, waiting up to `wait` seconds; False when it did not fit."""
        deadline = time.monotonic() + wait
        while self.used + size > self.limit:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or size > self.limit:
                return False
            self._released.clear()
            try:
                await asyncio.wait_for(self._released.wait(), remaining)
            except TimeoutError:
                return False
        self.used += size
        self.peak = max(self.peak, self.used)
        return True

    def release(self, size: int) -> None:
        """Return `size` bytes to the budget."""
        self.used = max(0, self.used - size)
        self._released.set()


class Refuse:
    """Answers a connection beyond the limit with 503 and closes it."""

    def connection_made(self, transport: Any) -> None:
        body = b'{"error": "too many connections; retry shortly"}'
        transport.write(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        transport.close()

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class LimitedSite(web.TCPSite):
    """A TCP site that accepts at most `limit` connections at once."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, limit: int, **kw: Any):
        super().__init__(runner, host, port, **kw)
        self._limit = limit

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None

        def factory() -> Any:
            return Refuse() if len(server.connections) >= self._limit else server()

        self._server = await asyncio.get_running_loop().create_server(
            factory,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
        )


class Tokens:
    """API tokens and their roles; compared in constant time, never stored in clear."""

    def __init__(self, settings: HttpGatewaySettings, context: BackendContext) -> None:
        self._entries: list[tuple[bytes, str, str]] = []
        for index, token in enumerate(settings.tokens):
            where = f"[gateways.http] tokens #{index + 1}"
            if token.env:
                value = os.environ.get(token.env, "").strip()
                if not value:
                    raise ConfigError(f"{where} key 'env': variable {token.env} is not set")
            else:
                path = context.resolve_path(token.file or "")
                try:
                    value = path.read_text().strip()
                except OSError as exc:
                    raise ConfigError(f"{where} key 'file': cannot read {path}: {exc}") from None
                if not value:
                    raise ConfigError(f"{where} key 'file': {path} is empty")
            if len(value) < 16:
                raise ConfigError(f"{where}: the token must have at least 16 characters")
            self._entries.append((self._digest(value), token.role, token.label))

    @staticmethod
    def _digest(value: str) -> bytes:
        return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()

    @property
    def enabled(self) -> bool:
        """True when any token is configured."""
        return bool(self._entries)

    def role_of(self, presented: str) -> tuple[str | None, str]:
        """(role, label) of a presented token, or (None, "") when it matches none."""
        digest = self._digest(presented)
        found: tuple[str | None, str] = (None, "")
        for known, role, label in self._entries:  # no early exit: same time for every token
            if hmac.compare_digest(digest, known) and RANK[role] > RANK[found[0]]:
                found = (role, label)
        return found


async def read_body(
    request: web.Request,
    settings: HttpGatewaySettings,
    budget: BodyBudget,
    peek: Callable[[memoryview], web.Response | None] | None = None,
) -> tuple[bytearray, int] | web.Response:
    """The body, read within the size limit, memory budget and read deadline.

    `peek(json_header)` sees the JSON header as soon as it has arrived and may answer
    instead (the rest is then never read). Returns (body, reserved bytes) or the error
    response to send.
    """
    s = settings
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    codings = {c.strip().lower() for c in request.headers.get("Transfer-Encoding", "").split(",")}
    if encoding != "identity" or codings - {"", "chunked", "identity"}:
        return error(
            415, "compressed request bodies are not accepted; send the tensors uncompressed"
        )
    declared = request.content_length
    if declared is not None and declared > s.max_request_bytes:
        response = error(
            413,
            f"request body of {declared} bytes is larger than this gateway accepts "
            f"({s.max_request_bytes} bytes, [gateways.http] max_request_bytes)",
        )
        response.force_close()
        return response
    reserved = 0
    busy = error(
        503,
        "the gateway is receiving too much data right now; retry shortly",
        {"Retry-After": "2"},
    )
    if declared is not None:
        if not await budget.acquire(declared, s.budget_wait):
            return busy
        reserved = declared
    try:
        async with asyncio.timeout(s.body_timeout):
            if declared is not None:
                body = bytearray(declared)
                view = memoryview(body)
                filled = 0
                head = _header_length(request, declared) if peek else 0
                while filled < declared:
                    want = head - filled if filled < head else declared - filled
                    chunk = await request.content.read(min(CHUNK, want))
                    if not chunk:
                        break
                    view[filled : filled + len(chunk)] = chunk
                    filled += len(chunk)
                    if head and filled == head and peek is not None:
                        early = peek(view[:head])
                        if early is not None:
                            view.release()
                            budget.release(reserved)
                            return early  # aiohttp discards the unread rest
                view.release()
                if filled != declared:
                    budget.release(reserved)
                    return error(400, "the body ended before its declared Content-Length")
                return body, reserved
            body = bytearray()
            async for chunk in request.content.iter_chunked(CHUNK):
                if len(body) + len(chunk) > s.max_request_bytes:
                    budget.release(reserved)
                    response = error(
                        413,
                        f"request body is larger than this gateway accepts "
                        f"({s.max_request_bytes} bytes, [gateways.http] max_request_bytes)",
                    )
                    response.force_close()
                    return response
                if not await budget.acquire(len(chunk), s.budget_wait):
                    budget.release(reserved)
                    return busy
                reserved += len(chunk)
                body += chunk
            return body, reserved
    except TimeoutError:
        budget.release(reserved)
        response = error(
            408,
            f"request body not received within {s.body_timeout:g} s ([gateways.http] body_timeout)",
        )
        response.force_close()
        return response
    except BaseException:
        budget.release(reserved)
        raise


async def small_json(request: web.Request, timeout: float, limit: int = 65536) -> Any:
    """A small JSON request body (admin calls), bounded in size and read time."""
    if request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
    try:
        raw = await asyncio.wait_for(request.content.read(limit + 1), timeout)
    except TimeoutError:
        raise InferenceError("request body not received in time", status=408) from None
    if len(raw) > limit:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(raw))
    try:
        return json.loads(raw or b"{}")
    except (ValueError, RecursionError):
        raise InferenceError("the body must be a JSON object", status=400) from None


def _header_length(request: web.Request, declared: int) -> int:
    """The declared JSON header length when it is plausible, else 0 (no early look)."""
    raw = request.headers.get(HEADER_LEN, "")
    if not raw.isdigit() or len(raw) > 9:
        return 0
    value = int(raw)
    return value if 0 < value <= min(declared, 1 << 20) else 0


__all__ = ["BodyBudget", "LimitedSite", "RANK", "Tokens", "error", "read_body", "small_json"]
