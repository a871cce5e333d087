"""The HTTP gateway: KServe v2 / Triton HTTP protocol in front of the engine (aiohttp).

Nothing a client sends reaches a replica as sent: routes are rebuilt from a served model id and
a numeric version, inference bodies are parsed and rebuilt by the engine (`kserve`), and only
headers the gateway writes itself are forwarded. Bodies are limited before they are read
(declared size, a memory budget over all requests, a read deadline); compressed bodies are
refused unread. Callers are authenticated by API tokens with two roles (inference, admin).
Also serves /health, Prometheus /metrics and /bioengine/status.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import __version__, logsafe
from .contracts import BackendContext, Gateway, Service
from .errors import BioEngineError, ConfigError, InferenceError, ModelNotFoundError
from .gateway_http import HttpGatewaySettings, is_loopback
from .kserve import HEADER_LEN

log = logging.getLogger("bioengine.gateway.http")

_VERSION_RE = re.compile(r"^[0-9]{1,9}$")
_FORWARDED = {"": "", "ready": "/ready", "config": "/config", "stats": "/stats"}
_RANK = {None: 0, "inference": 1, "admin": 2}
CHUNK = 1 << 20


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
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


class _Refuse:
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


class _LimitedSite(web.TCPSite):
    """A TCP site that accepts at most `limit` connections at once."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, *, limit: int, **kw: Any):
        super().__init__(runner, host, port, **kw)
        self._limit = limit

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None

        def factory() -> Any:
            return _Refuse() if len(server.connections) >= self._limit else server()

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
                import os

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
            if hmac.compare_digest(digest, known) and _RANK[role] > _RANK[found[0]]:
                found = (role, label)
        return found


class HttpGateway(Gateway):
    """Serves the KServe v2 HTTP protocol for the engine's models."""

    def __init__(self, settings: HttpGatewaySettings, context: BackendContext):
        self.settings = settings
        self.context = context
        self.tokens = Tokens(settings, context)
        if self.tokens.enabled:
            self.anonymous_role: str | None = "inference" if settings.allow_anonymous else None
        elif is_loopback(settings.host):
            self.anonymous_role = "admin"  # a workstation: whoever can connect runs it
        else:
            self.anonymous_role = "inference"  # allow_anonymous on an exposed address
        self.ssl_context = self._ssl_context()
        self.budget = BodyBudget(settings.body_memory_budget)
        self.service: Any = None
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.state = "stopped"

    def _ssl_context(self) -> ssl.SSLContext | None:
        s = self.settings
        if not s.tls_cert_file:
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert = self.context.resolve_path(s.tls_cert_file)
        key = self.context.resolve_path(s.tls_key_file or "")
        try:
            ctx.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"[gateways.http] key 'tls_cert_file': cannot load {cert} with key {key}: {exc}"
            ) from None
        return ctx

    def info(self) -> dict[str, Any]:
        return {
            "kind": "http",
            "url": self.url,
            "state": self.state,
            "auth": "tokens" if self.tokens.enabled else "none",
        }

    async def start(self, service: Service) -> None:
        s = self.settings
        self.service = service
        logsafe.install()
        app = web.Application(client_max_size=s.max_request_bytes, middlewares=[self._guard])
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/metrics", self.metrics)
        r.add_get("/bioengine/status", self.status)
        r.add_get("/bioengine/models", self.models)
        r.add_post("/bioengine/scale", self.scale)
        r.add_get("/v2", self.server_metadata)
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_post("/v2/repository/index", self.repository_index)
        r.add_post("/v2/repository/models/{model}/unload", self.unload)
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(prefix, self.forward_get)
            r.add_get(prefix + "/{what:ready|config|stats}", self.forward_get)
            r.add_post(prefix + "/infer", self.infer)
        self.runner = web.AppRunner(
            app,
            access_log=None,
            auto_decompress=False,
            keepalive_timeout=s.header_timeout,
            lingering_time=2.0,
            max_line_size=8190,
            max_field_size=8190,
            handler_cancellation=True,
        )
        await self.runner.setup()
        site = _LimitedSite(
            self.runner, s.host, s.port, limit=s.max_connections, ssl_context=self.ssl_context
        )
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        scheme = "https" if self.ssl_context else "http"
        shown = f"[{s.host}]" if ":" in s.host else s.host
        self.url = f"{scheme}://{shown}:{port}"
        self.state = "serving"
        log.info("HTTP gateway listening on %s", self.url)
        if s.exposed_anonymously:
            log.warning(
                "HTTP gateway on %s accepts callers without a token (allow_anonymous = true)",
                self.url,
            )

    async def stop(self) -> None:
        if self.runner is not None:
            self.state = "stopping"
            await self.runner.cleanup()
        self.state = "stopped"

    # ------------------------------------------------------------------ guard
    _NEEDS: dict[str, str | None] = {
        "/health": None,
        "/v2/health/live": None,
        "/v2/health/ready": None,
        "/metrics": "admin",
        "/bioengine/scale": "admin",
    }

    def _needed(self, request: web.Request) -> str | None:
        path = request.path
        if path in self._NEEDS:
            return self._NEEDS[path]
        if path.startswith("/v2/repository/models/"):
            return "admin"
        return "inference"

    def _role(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        if not header:
            return self.anonymous_role
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None
        role, _ = self.tokens.role_of(value.strip())
        return role

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Authentication, then the handler; every failure becomes a JSON 4xx/5xx, never a trace."""
        needed = self._needed(request)
        role = self._role(request)
        request["role"] = role
        if needed is not None and _RANK[role] < _RANK[needed]:
            presented = "Authorization" in request.headers
            if role is None or (not presented and self.tokens.enabled):
                return _error(
                    401,
                    "this call needs an API token: send 'Authorization: Bearer TOKEN'",
                    {"WWW-Authenticate": 'Bearer realm="bioengine"'},
                )
            who = "your token has" if presented else "anonymous callers have"
            return _error(403, f"this call needs the {needed} role; {who} the {role} role")
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason or "request refused", dict(exc.headers))
        except InferenceError as exc:
            if exc.status >= 500:
                log.warning("%s %s failed: %s", request.method, request.path[:100], exc)
            headers = {"Retry-After": "1"} if exc.status == 503 else None
            return _error(exc.status, str(exc), headers)
        except BioEngineError as exc:
            log.error("%s %s failed: %s", request.method, request.path[:100], exc)
            return _error(500, str(exc))
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            ref = secrets.token_hex(4)
            log.exception(
                "internal error (ref %s) on %s %s", ref, request.method, request.path[:100]
            )
            return _error(500, f"internal error (ref {ref}); the operator's log has the details")

    # ------------------------------------------------------------------ handlers
    async def health(self, request: web.Request) -> web.Response:
        ready = self.service.router.ready_count()
        data: dict[str, Any] = {"status": "ok" if ready else "unavailable", "replicas_ready": ready}
        if request["role"] is not None:
            data["models"] = sorted(self.service.models)
        return web.json_response(data, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.service.metrics.render(), content_type="text/plain", charset="utf-8"
        )

    async def status(self, request: web.Request) -> web.Response:
        data = self.service.status()
        if request["role"] != "admin":
            data = _summary(data)
        return web.json_response(data, dumps=lambda d: json.dumps(d, default=str))

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response([m.__dict__ for m in self.service.list_models()])

    async def scale(self, request: web.Request) -> web.Response:
        body = await self._small_json(request)
        replicas = body.get("replicas") if isinstance(body, dict) else None
        if not isinstance(replicas, int) or isinstance(replicas, bool) or not 0 <= replicas <= 64:
            return _error(400, 'send {"replicas": N} with 0 <= N <= 64')
        await self.service.scale(replicas)
        log.warning("scaled to %d replica(s) through the HTTP gateway", replicas)
        return web.json_response({"replicas": replicas})

    async def unload(self, request: web.Request) -> web.Response:
        model = self._known(request)
        await self.service.unload_model(model)
        log.warning("model %s unloaded through the HTTP gateway", model)
        return web.json_response({"unloaded": model})

    async def server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "name": "bioengine",
                "version": __version__,
                "extensions": ["binary_tensor_data", "model_repository"],
            }
        )

    async def live(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.service.router.ready_count() else 503)

    async def repository_index(self, request: web.Request) -> web.Response:
        return web.json_response(
            [{"name": m, "version": "1", "state": "READY"} for m in sorted(self.service.models)]
        )

    def _known(self, request: web.Request) -> str:
        """The served model id named in the route (and a valid version, if any)."""
        model = request.match_info["model"]
        if model not in self.service.models:
            raise ModelNotFoundError(model[:100], list(self.service.models))
        version = request.match_info.get("version")
        if version is not None and not _VERSION_RE.fullmatch(version):
            raise InferenceError(
                f"model version must be a number, not {version[:20]!r}", status=400
            )
        return model

    async def forward_get(self, request: web.Request) -> web.Response:
        model = self._known(request)
        version = request.match_info.get("version")
        path = f"/v2/models/{model}"
        if version is not None:
            path += f"/versions/{int(version)}"
        path += _FORWARDED[request.match_info.get("what", "")]
        status, data, headers = await self.service.router.request("GET", path, timeout=30)
        if status >= 400:
            from .router import error_message

            return _error(status, error_message(data)[:2000])
        return web.Response(status=status, body=data, content_type="application/json")

    async def _small_json(self, request: web.Request, limit: int = 65536) -> Any:
        if request.content_length is not None and request.content_length > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=request.content_length)
        try:
            raw = await asyncio.wait_for(
                request.content.read(limit + 1), self.settings.body_timeout
            )
        except TimeoutError:
            raise InferenceError("request body not received in time", status=408) from None
        if len(raw) > limit:
            raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=len(raw))
        try:
            return json.loads(raw or b"{}")
        except (ValueError, RecursionError):
            raise InferenceError("the body must be a JSON object", status=400) from None

    async def _read_body(
        self,
        request: web.Request,
        peek: Callable[[memoryview], web.Response | None] | None = None,
    ) -> tuple[bytearray, int] | web.Response:
        """The body, read within the size limit, memory budget and read deadline.

        `peek(json_header)` sees the JSON header as soon as it has arrived and may answer
        instead (the rest is then never read). Returns (body, reserved bytes) or the error
        response to send.
        """
        s = self.settings
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding != "identity":
            return _error(
                415, "compressed request bodies are not accepted; send the tensors uncompressed"
            )
        declared = request.content_length
        if declared is not None and declared > s.max_request_bytes:
            response = _error(
                413,
                f"request body of {declared} bytes is larger than this gateway accepts "
                f"({s.max_request_bytes} bytes, [gateways.http] max_request_bytes)",
            )
            response.force_close()
            return response
        reserved = 0
        busy = _error(
            503,
            "the gateway is receiving too much data right now; retry shortly",
            {"Retry-After": "2"},
        )
        if declared is not None:
            if not await self.budget.acquire(declared, s.budget_wait):
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
                                self.budget.release(reserved)
                                return early  # aiohttp discards the unread rest
                    view.release()
                    if filled != declared:
                        self.budget.release(reserved)
                        return _error(400, "the body ended before its declared Content-Length")
                    return body, reserved
                body = bytearray()
                async for chunk in request.content.iter_chunked(CHUNK):
                    if len(body) + len(chunk) > s.max_request_bytes:
                        self.budget.release(reserved)
                        response = _error(
                            413,
                            f"request body is larger than this gateway accepts "
                            f"({s.max_request_bytes} bytes, [gateways.http] max_request_bytes)",
                        )
                        response.force_close()
                        return response
                    if not await self.budget.acquire(len(chunk), s.budget_wait):
                        self.budget.release(reserved)
                        return busy
                    reserved += len(chunk)
                    body += chunk
                return body, reserved
        except TimeoutError:
            self.budget.release(reserved)
            response = _error(
                408,
                f"request body not received within {s.body_timeout:g} s "
                "([gateways.http] body_timeout)",
            )
            response.force_close()
            return response
        except BaseException:
            self.budget.release(reserved)
            raise

    def _early_answer(self, model: str, header: memoryview) -> web.Response | None:
        """504 at once for a deadline this model has never been answered within."""
        try:
            params = json.loads(bytes(header)).get("parameters") or {}
            timeout = params.get("timeout")
        except (ValueError, RecursionError, AttributeError):
            return None  # the full parser says what is wrong
        if isinstance(timeout, int) and timeout > 0:
            if self.service.would_time_out(model, timeout / 1e6):
                return _error(
                    504,
                    f"request timed out: model '{model}' has not answered within "
                    f"{timeout / 1e3:g} ms recently (the caller's deadline)",
                )
        return None

    async def infer(self, request: web.Request) -> web.StreamResponse:
        model = self._known(request)
        read = await self._read_body(request, peek=lambda head: self._early_answer(model, head))
        if isinstance(read, web.StreamResponse):
            return read
        body, reserved = read
        try:
            header_length = request.headers.get(HEADER_LEN)
            headers = {HEADER_LEN: header_length} if header_length is not None else {}
            status, data, out_headers = await self.service.infer_raw(model, body, headers)
        finally:
            del body
            self.budget.release(reserved)
        resp = web.Response(status=status, body=data)
        for key, value in out_headers.items():
            resp.headers[key] = value
        return resp


def _header_length(request: web.Request, declared: int) -> int:
    """The declared JSON header length when it is plausible, else 0 (no early look)."""
    raw = request.headers.get(HEADER_LEN, "")
    if not raw.isdigit() or len(raw) > 9:
        return 0
    value = int(raw)
    return value if 0 < value <= min(declared, 1 << 20) else 0


def _summary(status: dict[str, Any]) -> dict[str, Any]:
    """Status without processes, ports, paths or storage locations (for non-admin callers)."""
    return {
        "deployment": status.get("deployment"),
        "executor": status.get("executor"),
        "storage": {"kind": (status.get("storage") or {}).get("kind"), "uri": "(admin only)"},
        "target_replicas": status.get("target_replicas"),
        "ready_replicas": status.get("ready_replicas"),
        "replicas": [
            {"id": r.get("id"), "state": r.get("state"), "routed": r.get("routed")}
            for r in status.get("replicas", [])
        ],
        "models": status.get("models", []),
        "gateways": {
            name: {"kind": g.get("kind"), "state": g.get("state")}
            for name, g in (status.get("gateways") or {}).items()
        },
        "uptime_s": status.get("uptime_s"),
        "details": "admin only",
    }


__all__ = ["BodyBudget", "HttpGateway", "Tokens"]
