"""The HTTP gateway: KServe v2 / Triton HTTP protocol in front of the engine (aiohttp).

Nothing a client sends reaches a replica as sent: routes are rebuilt from a served model id and
a numeric version, inference bodies are parsed and rebuilt by the engine (`kserve`), and only
headers the gateway writes itself are forwarded. Bodies are limited before they are read
(declared size, a memory budget over all requests, a read deadline); compressed bodies are
refused unread. Callers are authenticated by API tokens with two roles (inference, admin).
Also serves /health, Prometheus /metrics, /bioengine/status, and the web page at /
(`gateway_web`: the page, its helper routes and CORS for the origins allowed in the config).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from . import __version__, logsafe
from .contracts import BackendContext, Gateway, Service
from .errors import BioEngineError, ConfigError, InferenceError, ModelNotFoundError
from .gateway_http import HttpGatewaySettings, is_loopback
from .gateway_jobs import JobRoutes
from .gateway_web import WebRoutes, cors_middleware
from .http_guard import RANK, BodyBudget, LimitedSite, Tokens, error, read_body, small_json
from .kserve import HEADER_LEN

log = logging.getLogger("bioengine.gateway.http")

_VERSION_RE = re.compile(r"^[0-9]{1,9}$")


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
        app = web.Application(
            client_max_size=s.max_request_bytes,
            middlewares=[cors_middleware(s.cors_origins), self._guard],
        )
        r = app.router
        WebRoutes(self).add_to(r)
        JobRoutes(self).add_to(r)
        r.add_get("/health", self.health)
        r.add_get("/metrics", self.metrics)
        r.add_get("/bioengine/status", self.status)
        r.add_get("/bioengine/models", self.models)
        r.add_get("/bioengine/models/{model}", self.model_description)
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
        site = LimitedSite(
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
        "/": None,
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
        if path.startswith("/web/"):
            return None  # the page's own files: no secrets, and a browser sends no token
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
        if needed is not None and RANK[role] < RANK[needed]:
            presented = "Authorization" in request.headers
            if role is None or (not presented and self.tokens.enabled):
                return error(
                    401,
                    "this call needs an API token: send 'Authorization: Bearer TOKEN'",
                    {"WWW-Authenticate": 'Bearer realm="bioengine"'},
                )
            who = "your token has" if presented else "anonymous callers have"
            return error(403, f"this call needs the {needed} role; {who} the {role} role")
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            kept = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
            return error(exc.status, exc.reason or "request refused", kept)
        except InferenceError as exc:
            if exc.status >= 500:
                log.warning("%s %s failed: %s", request.method, request.path[:100], exc)
            retry = getattr(exc, "retry_after", 1.0 if exc.status == 503 else None)
            headers = {"Retry-After": str(max(1, round(retry)))} if retry is not None else None
            return error(exc.status, str(exc), headers)
        except BioEngineError as exc:
            log.error("%s %s failed: %s", request.method, request.path[:100], exc)
            return error(500, str(exc))
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception:
            ref = secrets.token_hex(4)
            log.exception(
                "internal error (ref %s) on %s %s", ref, request.method, request.path[:100]
            )
            return error(500, f"internal error (ref {ref}); the operator's log has the details")

    # ------------------------------------------------------------------ handlers
    async def health(self, request: web.Request) -> web.Response:
        ready = self.service.ready_replicas()
        data: dict[str, Any] = {"status": "ok" if ready else "unavailable", "replicas_ready": ready}
        if request["role"] is not None:
            data["models"] = self.service.model_ids()
        return web.json_response(data, status=200 if ready else 503)

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.service.metrics_text(), content_type="text/plain", charset="utf-8"
        )

    async def status(self, request: web.Request) -> web.Response:
        data = self.service.status()
        if request["role"] != "admin":
            data = _summary(data)
        return web.json_response(data, dumps=lambda d: json.dumps(d, default=str))

    async def models(self, request: web.Request) -> web.Response:
        """`?q=WORDS&limit=N`: the models offered here (the whole catalog in catalog mode)."""
        query = request.query.get("q", "")
        limit_text = request.query.get("limit", "50")
        if len(query) > 200 or any(ord(c) < 32 for c in query):
            return error(400, "q: at most 200 printable characters")
        if not limit_text.isdigit() or not 1 <= int(limit_text) <= 1000:
            return error(400, "limit: a whole number from 1 to 1000")
        return web.json_response(self.service.search_models(query, int(limit_text)))

    async def model_description(self, request: web.Request) -> web.Response:
        """A served model's bioimage.io description and the weight format it runs with (what
        `bioengine test` judges by); loads it first in catalog mode."""
        model = await self._known(request)
        info = next((m for m in self.service.list_models() if m.id == model), None)
        body = {
            "id": model,
            "weight_format": info.weight_format if info else None,
            "description": self.service.get_model(model),
        }
        return web.json_response(body, dumps=lambda d: json.dumps(d, default=str))

    async def scale(self, request: web.Request) -> web.Response:
        body = await small_json(request, self.settings.body_timeout)
        replicas = body.get("replicas") if isinstance(body, dict) else None
        if not isinstance(replicas, int) or isinstance(replicas, bool) or not 0 <= replicas <= 64:
            return error(400, 'send {"replicas": N} with 0 <= N <= 64')
        await self.service.scale(replicas)
        log.warning("scaled to %d replica(s) through the HTTP gateway", replicas)
        return web.json_response({"replicas": replicas})

    async def unload(self, request: web.Request) -> web.Response:
        model = request.match_info["model"]
        if model not in self.service.model_ids():  # never load a model to unload it
            raise ModelNotFoundError(model[:100], self.service.model_ids())
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
        return web.Response(status=200 if self.service.ready_replicas() else 503)

    async def repository_index(self, request: web.Request) -> web.Response:
        return web.json_response(
            [{"name": m, "version": "1", "state": "READY"} for m in self.service.model_ids()]
        )

    async def _known(self, request: web.Request) -> str:
        """The model id named in the route, served (loaded first in catalog mode), and a valid
        version, if any."""
        model = request.match_info["model"]
        if len(model) > 100:
            raise ModelNotFoundError(model[:100] + "...", self.service.model_ids())
        await self.service.ensure_model(model)
        version = request.match_info.get("version")
        if version is not None and not _VERSION_RE.fullmatch(version):
            raise InferenceError(
                f"model version must be a number, not {version[:20]!r}", status=400
            )
        return model

    async def forward_get(self, request: web.Request) -> web.Response:
        model = await self._known(request)
        version = request.match_info.get("version")
        status, data = await self.service.triton_get(
            model,
            request.match_info.get("what") or "metadata",
            version=int(version) if version is not None else None,
        )
        return web.Response(status=status, body=data, content_type="application/json")

    def _early_answer(self, model: str, header: memoryview) -> web.Response | None:
        """504 at once for a deadline this model has never been answered within."""
        try:
            params = json.loads(bytes(header)).get("parameters") or {}
            timeout = params.get("timeout")
        except (ValueError, RecursionError, AttributeError):
            return None  # the full parser says what is wrong
        if isinstance(timeout, int) and timeout > 0:
            if self.service.would_time_out(model, timeout / 1e6):
                return error(
                    504,
                    f"request timed out: model '{model}' has not answered within "
                    f"{timeout / 1e3:g} ms recently (the caller's deadline)",
                )
        return None

    async def infer(self, request: web.Request) -> web.StreamResponse:
        model = await self._known(request)
        read = await read_body(
            request, self.settings, self.budget, peek=lambda head: self._early_answer(model, head)
        )
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


__all__ = ["HttpGateway"]
