"""A lean keep-alive HTTP/1.1 client for the hop from the gateway to a replica.

The router needs only status, a few headers and the body back; a general client (aiohttp)
spends most of the gateway's per-request CPU on features this hop does not use. Responses are
parsed with httptools (the parser uvicorn uses).

It trusts nothing it is given or sent: the request line and headers are checked for anything
that could end a line or start another request; a connection that delivers bytes nobody asked
for (a second response, data while idle) is closed at once, never reused, so an answer can
never be handed to the next caller.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping, Sequence

import httptools

_PATH_RE = re.compile(r"^/[A-Za-z0-9._~/-]{0,512}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9-]{1,64}$")
_VALUE_RE = re.compile(r"^[\x20-\x7e]{0,1024}$")
_METHODS = ("GET", "POST")


class StalledError(ConnectionError):
    """The replica stopped answering; the request was abandoned so it can be sent elsewhere."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.parser = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.started = False
        self.messages = 0
        self.keep_alive = True
        self.waiter: asyncio.Future | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            # bytes nobody asked for: a stray or extra response; never reuse this connection
            self._fail(ConnectionError("replica sent data without a request"))
            return
        self.started = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ConnectionError("replica tried to upgrade the connection"))
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"bad HTTP response from replica: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionError(f"replica closed the connection: {exc or 'EOF'}"))

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        if self.transport is not None:
            self.transport.close()
        self.closed = True

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.messages += 1
        if self.messages > 1:
            self._fail(ConnectionError("replica sent more than one response to one request"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


def _request_head(
    method: str, path: str, host: bytes, length: int, headers: Mapping[str, str] | None
) -> bytes:
    """The request line and headers, from checked parts only (ValueError otherwise)."""
    if method not in _METHODS:
        raise ValueError(f"method {method!r} is not forwarded")
    if not _PATH_RE.fullmatch(path):
        raise ValueError(f"refusing to forward path {path[:80]!r}")
    lines = [
        f"{method} {path} HTTP/1.1".encode(),
        b"Host: " + host,
        b"Content-Length: " + str(length).encode(),
    ]
    for key, value in (headers or {}).items():
        if not _NAME_RE.fullmatch(key) or not _VALUE_RE.fullmatch(value):
            raise ValueError(f"refusing to forward header {key[:40]!r}")
        lines.append(f"{key}: {value}".encode("ascii"))
    return b"\r\n".join(lines) + b"\r\n\r\n"


class Upstream:
    """A pool of keep-alive connections to one replica's HTTP endpoint."""

    def __init__(self, host: str, port: int, *, max_idle: int = 32):
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._host_header = f"{host}:{port}".encode()

    def host_port(self) -> tuple[str, int]:
        """Where this pool connects."""
        return self.host, self.port

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, self.host, self.port)
        return conn

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | Sequence[bytes | memoryview] | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> tuple[int, bytes, dict[str, str]]:
        """Send one request; returns (status, body, lower-cased headers).

        `body` may be a list of buffers (sent without joining them). Raises ConnectionError when
        the replica cannot be reached, misbehaves or is declared stalled (StalledError),
        TimeoutError after `timeout` seconds (the connection is then discarded), ValueError for
        a method, path or header that must not be forwarded.
        """
        parts = [body] if isinstance(body, (bytes, bytearray, memoryview)) else list(body or [])
        length = sum(len(p) for p in parts)
        head = _request_head(method, path, self._host_header, length, headers)
        for attempt in (0, 1):
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await self._connect()
            if conn.closed:
                continue
            conn._reset()
            conn.waiter = asyncio.get_running_loop().create_future()
            assert conn.transport is not None
            self._busy.add(conn)
            try:
                conn.transport.writelines([head, *parts])
                await asyncio.wait_for(conn.waiter, timeout)
            except StalledError:
                raise
            except ConnectionError:
                # a pooled connection the replica closed while idle: retry once on a new one
                if reused and not conn.started and attempt == 0:
                    continue
                raise
            except (TimeoutError, asyncio.CancelledError):
                conn._fail(ConnectionError("abandoned"))  # its answer may still come: discard
                raise
            finally:
                self._busy.discard(conn)
            data = b"".join(conn.chunks)
            if conn.keep_alive and not conn.closed and len(self._idle) < self.max_idle:
                self._idle.append(conn)
            elif conn.transport is not None:
                conn.transport.close()
            return conn.status, data, conn.headers
        raise ConnectionError(f"cannot reach replica {self.host}:{self.port}")

    def abort(self, reason: str) -> int:
        """Fail every request in flight with StalledError (to resend elsewhere); returns how many."""
        busy = list(self._busy)
        for conn in busy:
            conn._fail(StalledError(reason))
        self.close()
        return len(busy)

    def close(self) -> None:
        """Close every pooled connection."""
        while self._idle:
            conn = self._idle.pop()
            if conn.transport is not None:
                conn.transport.close()
