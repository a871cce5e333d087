"""The HTTP gateway's job routes (`/bioengine/jobs`): submit a KServe body as a job, follow its
progress, fetch its answer, cancel it. The work itself is the service's (see `jobs`)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from .http_guard import error, read_body
from .kserve import HEADER_LEN


class JobRoutes:
    """Handlers of `/bioengine/jobs` for an `HttpGateway`."""

    def __init__(self, gateway: Any) -> None:
        self.gateway = gateway

    def add_to(self, router: web.UrlDispatcher) -> None:
        """Register the job routes."""
        router.add_post("/bioengine/jobs", self.submit)
        router.add_get("/bioengine/jobs/{job}", self.status)
        router.add_get("/bioengine/jobs/{job}/result", self.result)
        router.add_delete("/bioengine/jobs/{job}", self.cancel)

    async def submit(self, request: web.Request) -> web.StreamResponse:
        """`POST /bioengine/jobs?model=ID` with the same body as `/v2/models/ID/infer`: 202 and
        the job (its id, state and progress); `Location` is where to follow it."""
        gw = self.gateway
        model = request.query.get("model", "")
        if not model:
            return error(400, "name the model: POST /bioengine/jobs?model=ID")
        await gw.service.ensure_model(model)
        read = await read_body(request, gw.settings, gw.budget)
        if isinstance(read, web.StreamResponse):
            return read
        body, reserved = read
        try:
            length = request.headers.get(HEADER_LEN)
            headers = {HEADER_LEN: length} if length is not None else {}
            info = await gw.service.submit_job(model, bytes(body), headers)
        finally:
            del body
            gw.budget.release(reserved)
        resp = web.json_response(info, status=202)
        resp.headers["Location"] = f"/bioengine/jobs/{info['id']}"
        return resp

    async def status(self, request: web.Request) -> web.Response:
        """The job's state and progress (blocks done / total)."""
        info = self.gateway.service.job(request.match_info["job"])
        return web.json_response(info, dumps=lambda d: json.dumps(d, default=str))

    async def result(self, request: web.Request) -> web.Response:
        """The job's answer, exactly as `/infer` would have answered (409 until it is done)."""
        status, data, headers = self.gateway.service.job_result(request.match_info["job"])
        resp = web.Response(status=status, body=data)
        for key, value in headers.items():
            resp.headers[key] = value
        return resp

    async def cancel(self, request: web.Request) -> web.Response:
        """Stop a job: no more of its blocks start; its state becomes `cancelled`."""
        return web.json_response(self.gateway.service.cancel_job(request.match_info["job"]))


__all__ = ["JobRoutes"]
