"""The HTTP gateway: KServe v2 / Triton HTTP protocol in front of the router (aiohttp).

Inference bodies go to the engine's `infer_raw`, which validates them against the model's
description from the JSON header alone and forwards them unchanged to a replica, so binary
tensors are never decoded. Also serves /health, Prometheus /metrics and /bioengine/status.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from aiohttp import web

from . import __version__
from .contracts import BackendContext, Gateway, Service
from .errors import BioEngineError, InferenceError, InvalidInputError, ModelNotFoundError
from .gateway_http import HttpGatewaySettings
from .router import HEADER_LEN

log = logging.getLogger("bioengine.gateway.http")


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


class HttpGateway(Gateway):
    """Serves the KServe v2 HTTP protocol for the engine's models."""

    def __init__(self, settings: HttpGatewaySettings, context: BackendContext):
        self.settings = settings
        self.context = context
        self.service: Any = None
        self.runner: web.AppRunner | None = None
        self.url = ""
        self.state = "stopped"

    def info(self) -> dict[str, Any]:
        return {"kind": "http", "url": self.url, "state": self.state}

    async def start(self, service: Service) -> None:
        self.service = service
        app = web.Application(client_max_size=1024**3)
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/metrics", self.metrics)
        r.add_get("/bioengine/status", self.status)
        r.add_get("/bioengine/models", self.models)
        r.add_get("/v2", self.server_metadata)
        r.add_get("/v2/health/live", self.live)
        r.add_get("/v2/health/ready", self.ready)
        r.add_post("/v2/repository/index", self.repository_index)
        for prefix in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            r.add_get(prefix, self.forward_get)
            r.add_get(prefix + "/ready", self.forward_get)
            r.add_get(prefix + "/config", self.forward_get)
            r.add_get(prefix + "/stats", self.forward_get)
            r.add_post(prefix + "/infer", self.infer)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.settings.host, self.settings.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{self.settings.host}:{port}"
        self.state = "serving"
        log.info("HTTP gateway listening on %s", self.url)

    async def stop(self) -> None:
        if self.runner is not None:
            self.state = "stopping"
            await self.runner.cleanup()
        self.state = "stopped"

    # ------------------------------------------------------------------ handlers
    async def health(self, request: web.Request) -> web.Response:
        ready = self.service.router.ready_count()
        return web.json_response(
            {
                "status": "ok" if ready else "unavailable",
                "replicas_ready": ready,
                "models": sorted(self.service.models),
            },
            status=200 if ready else 503,
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.service.metrics.render(), content_type="text/plain", charset="utf-8"
        )

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.service.status(), dumps=lambda d: json.dumps(d, default=str))

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response([m.__dict__ for m in self.service.list_models()])

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
        model = request.match_info["model"]
        if model not in self.service.models:
            raise ModelNotFoundError(model, list(self.service.models))
        return model

    async def forward_get(self, request: web.Request) -> web.Response:
        try:
            self._known(request)
            status, data, headers = await self.service.router.request(
                "GET", request.rel_url.path, timeout=30
            )
        except InferenceError as exc:
            return _error(exc.status, str(exc))
        return web.Response(
            status=status, body=data, content_type=headers.get("Content-Type", "application/json")
        )

    async def infer(self, request: web.Request) -> web.Response:
        try:
            model = self._known(request)
            body = await request.read()
            header_length = request.headers.get(HEADER_LEN)
            if request.headers.get("Content-Encoding"):
                raise InvalidInputError(f"model '{model}': compressed requests are not supported")
            headers = {
                "Content-Type": request.headers.get("Content-Type", "application/octet-stream")
            }
            if header_length:
                headers[HEADER_LEN] = header_length
            status, data, out_headers = await self.service.infer_raw(model, body, headers)
        except InferenceError as exc:
            if exc.status >= 500:
                log.warning("infer failed: %s", exc)
            return _error(exc.status, str(exc))
        except BioEngineError as exc:
            return _error(500, str(exc))
        resp = web.Response(status=status, body=data)
        for key, value in out_headers.items():
            resp.headers[key] = value
        return resp


__all__ = ["HttpGateway"]
