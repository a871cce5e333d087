"""A lean keep-alive HTTP/1.1 client for the hop from the gateway to a replica.

The router forwards request bodies unchanged and needs only status, two headers and the body
back; a general client (aiohttp) spends most of the gateway's per-request CPU on features this
hop does not use. Responses are parsed with httptools (the parser uvicorn uses).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

import httptools


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._reset()

    def _reset(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: dict[str, str] = {}
        self.chunks: list[bytes] = []
        self.started = False
        self.keep_alive = True
        self.waiter: asyncio.Future | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.started = True
        try:
            self.parser.feed_data(data)
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


class Upstream:
    """A pool of keep-alive connections to one replica's HTTP endpoint."""

    def __init__(self, host: str, port: int, *, max_idle: int = 32):
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self._idle: list[_Connection] = []
        self._host_header = f"{host}:{port}".encode()

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(_Connection, self.host, self.port)
        return conn

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 60.0,
    ) -> tuple[int, bytes, dict[str, str]]:
        """Send one request; returns (status, body, lower-cased headers).

        Raises ConnectionError when the replica cannot be reached or drops the connection,
        asyncio.TimeoutError after `timeout` seconds.
        """
        body = body or b""
        lines = [
            f"{method} {path} HTTP/1.1".encode(),
            b"Host: " + self._host_header,
            b"Content-Length: " + str(len(body)).encode(),
        ]
        for key, value in (headers or {}).items():
            lines.append(f"{key}: {value}".encode("latin-1"))
        head = b"\r\n".join(lines) + b"\r\n\r\n"
        for attempt in (0, 1):
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await self._connect()
            if conn.closed:
                continue
            conn._reset()
            conn.waiter = asyncio.get_running_loop().create_future()
            assert conn.transport is not None
            conn.transport.writelines([head, body] if body else [head])
            try:
                await asyncio.wait_for(conn.waiter, timeout)
            except ConnectionError:
                # a pooled connection the replica closed while idle: retry once on a new one
                if reused and not conn.started and attempt == 0:
                    continue
                raise
            except TimeoutError:
                conn._fail(ConnectionError("timeout"))
                raise
            data = b"".join(conn.chunks)
            if conn.keep_alive and not conn.closed and len(self._idle) < self.max_idle:
                self._idle.append(conn)
            elif conn.transport is not None:
                conn.transport.close()
            return conn.status, data, conn.headers
        raise ConnectionError(f"cannot reach replica {self.host}:{self.port}")

    def close(self) -> None:
        """Close every pooled connection."""
        while self._idle:
            conn = self._idle.pop()
            if conn.transport is not None:
                conn.transport.close()
