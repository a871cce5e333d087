"""HyphaGateway: registers the BioEngine service on a Hypha server and keeps it registered."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from bioengine_core.contracts import BackendContext, Gateway, Service

from .api import Authoriser, HyphaApi, caller_of
from .diagnose import ConnectionProblem, describe
from .direct import DirectLimits, DirectServer, Tickets, ticket_payload
from .errors import install_error_guard
from .server import EmbeddedHyphaServer
from .settings import HyphaGatewaySettings, read_secret
from .wsopts import websocket_compression

log = logging.getLogger("bioengine.gateway.hypha")

# Connection states reported by info()["state"].
STOPPED = "stopped"
STARTING = "starting"
CONNECTING = "connecting"
CONNECTED = "connected"
RECONNECTING = "reconnecting"
STOPPING = "stopping"


class HyphaGateway(Gateway):
    """Exposes a Service as `bioengine-model-runner` and `triton-client` services on Hypha."""

    def __init__(self, settings: HyphaGatewaySettings, context: BackendContext) -> None:
        self.settings = settings
        self.context = context
        self.state = STOPPED
        self.last_error: str | None = None
        self.reconnects = 0
        self.connected_since: float | None = None
        self.workspace: str | None = None
        self.embedded: EmbeddedHyphaServer | None = None
        self.direct: DirectServer | None = None
        self._tickets = Tickets(settings.direct_ticket_ttl)
        self._server: Any = None  # the hypha-rpc connection
        self._api: HyphaApi | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._token = None
        self._service_ids: dict[str, str] = {}

    # ------------------------------------------------------------------ Gateway API
    @property
    def server_url(self) -> str:
        """URL of the Hypha server this gateway registers on."""
        if self.embedded is not None:
            return self.embedded.url
        return str(self.settings.server_url)

    async def start(self, service: Service) -> None:
        """Start the embedded server (if any), connect, register, then keep it registered."""
        try:
            await self._start(service)
        except BaseException:
            await self.stop()  # leave no child server or open port behind
            raise

    async def _start(self, service: Service) -> None:
        s = self.settings
        self.state = STARTING
        self._stopping = asyncio.Event()
        self._token = read_secret(s.token_env, s.token_file, "token", self.context)
        admin_secret = read_secret(
            s.admin_token_env, s.admin_token_file, "admin token", self.context
        )
        if s.embedded:
            from .server import hypha_installed

            if not hypha_installed():
                from bioengine_core.errors import ConfigError

                raise ConfigError(
                    "[gateways.hypha] embedded = true needs the Hypha server: "
                    "pip install 'bioengine-gateway-hypha[server]'"
                )
            self.embedded = EmbeddedHyphaServer(
                host=s.host,
                port=s.port,
                log_path=self.context.state_dir / "hypha" / "server.log",
                extra_args=s.server_args,
                public_url=s.public_url,
                ws_compression=s.ws_compression,
                withhold_env=[name for name in (s.token_env, s.admin_token_env) if name],
            )
            await self.embedded.start(s.startup_timeout)
        self._api = HyphaApi(
            service,
            Authoriser(s.admin_users, admin_secret),
            gateway_info=self.info,
            direct_ticket=self._issue_ticket if s.direct else None,
            max_input_bytes=s.rpc_max_input_bytes,
        )
        if s.direct:
            self.direct = DirectServer(
                self._api.run,
                self._tickets,
                host=s.direct_host,
                port=s.direct_port,
                check_inputs=self._api.check_specs,
                model_exists=self._api.input_ids,
                limits=DirectLimits(
                    max_request_bytes=s.direct_max_request_bytes,
                    read_timeout=s.direct_read_timeout,
                    body_timeout=s.direct_body_timeout,
                ),
            )
            await self.direct.start()
        self.state = CONNECTING
        try:
            await asyncio.wait_for(self._connect(), s.connect_timeout)
        except Exception as exc:
            # Proxy mode: the server may be down right now; keep trying in the background.
            # A refused token or workspace will not heal by itself: serve stops with the fix.
            if self._note_failure(exc).permanent:
                from bioengine_core.errors import ConfigError

                raise ConfigError(self.last_error or "") from exc
        self._supervisor = asyncio.create_task(self._supervise(), name="hypha-gateway")

    async def stop(self) -> None:
        """Unregister, disconnect, stop the direct path and the embedded server."""
        self.state = STOPPING
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._supervisor
            self._supervisor = None
        deadline = time.monotonic() + 10
        while self._api and self._api.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self._disconnect(unregister=True)
        if self.direct is not None:
            await self.direct.stop()
        if self.embedded is not None:
            await self.embedded.stop()
        self.state = STOPPED

    def info(self) -> dict[str, Any]:
        """Connection state and where users find the services (never the token)."""
        s = self.settings
        ws = self.workspace or s.effective_workspace
        data: dict[str, Any] = {
            "kind": "hypha",
            "url": (s.public_url or self.server_url) if s.embedded else self.server_url,
            "state": self.state,
            "mode": "embedded" if s.embedded else "proxy",
            "workspace": ws,
            "services": {
                "bioengine-model-runner": f"{ws}/{s.service_id}" if ws else s.service_id,
                "triton-client": f"{ws}/{s.triton_service_id}" if ws else s.triton_service_id,
            },
            "visibility": s.visibility,
            "reconnects": self.reconnects,
            "connected_since": self.connected_since,
            "last_error": self.last_error,
        }
        if self.embedded is not None:
            data["server_pid"] = self.embedded.process.pid if self.embedded.process else None
            data["server_log"] = str(self.embedded.log_path)
        if self.direct is not None:
            data["direct_url"] = s.direct_url or self.direct.url
        return data

    # ------------------------------------------------------------------ connection
    def _issue_ticket(self, context: dict[str, Any] | None) -> dict[str, Any]:
        user = caller_of(context)
        ticket, expires = self._tickets.issue(str(user.get("id") or "anonymous"))
        assert self.direct is not None
        return ticket_payload(self.settings.direct_url or self.direct.url, ticket, expires)

    async def _connect(self) -> None:
        """One full attempt: connect, enter the workspace, register both services."""
        with websocket_compression(self.settings.ws_compression):
            await self._connect_and_register()

    async def _connect_and_register(self) -> None:
        from hypha_rpc import connect_to_server

        s = self.settings
        base: dict[str, Any] = {
            "server_url": self.server_url,
            "client_id": s.effective_client_id,
            "name": "BioEngine",
            "method_timeout": 120,
        }
        token = self._root_or_user_token()
        if token:
            base["token"] = token
        ws = s.effective_workspace
        server = await connect_to_server(base)
        if ws and server.config.workspace != ws:
            scope = (server.config.get("user") or {}).get("scope") or {}
            if ws in (scope.get("workspaces") or {}):
                # The token already grants the workspace: enter it directly.
                with contextlib.suppress(Exception):
                    await server.disconnect()
                server = await connect_to_server({**base, "workspace": ws})
            else:
                server = await self._enter_workspace(server, base, ws)
        try:
            assert self._api is not None
            install_error_guard(server)  # callers get messages, not our tracebacks
            runner = await server.register_service(
                self._api.runner_definition(s.service_id, s.visibility), {"overwrite": True}
            )
            triton = await server.register_service(
                self._api.triton_definition(s.triton_service_id, s.visibility),
                {"overwrite": True},
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await server.disconnect()
            raise
        self._server = server
        self.workspace = server.config.workspace
        self._service_ids = {"runner": runner["id"], "triton": triton["id"]}
        if self.state in (RECONNECTING,):
            self.reconnects += 1
        self.state = CONNECTED
        self.connected_since = time.time()
        self.last_error = None
        log.info(
            "registered on %s: %s/%s and %s/%s",
            self.server_url,
            self.workspace,
            s.service_id,
            self.workspace,
            s.triton_service_id,
        )

    def _root_or_user_token(self) -> str | None:
        if self.embedded is not None and self._token is None:
            return self.embedded.root_token
        return self._token.get_secret_value() if self._token is not None else None

    async def _enter_workspace(self, server: Any, base: dict[str, Any], ws: str) -> Any:
        """Create workspace `ws` if needed and reconnect with a token scoped to it."""
        from hypha_rpc import connect_to_server

        try:
            try:
                await server.get_workspace_info(ws)
            except Exception:
                await server.create_workspace(
                    {
                        "id": ws,
                        "name": ws,
                        "description": "BioEngine deployment",
                        "persistent": True,
                        "owners": [],
                    },
                    overwrite=False,
                )
            scoped = await server.generate_token(
                {"workspace": ws, "expires_in": 30 * 24 * 3600, "permission": "admin"}
            )
        finally:
            with contextlib.suppress(Exception):
                await server.disconnect()
        return await connect_to_server({**base, "token": scoped, "workspace": ws})

    async def _disconnect(self, *, unregister: bool) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        if unregister:
            for sid in self._service_ids.values():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(server.unregister_service(sid), 3)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.disconnect(), 5)

    async def _healthy(self) -> bool:
        """True if the server still knows our runner service (checked through our connection)."""
        if self._server is None:
            return False
        if self.embedded is not None and not self.embedded.running():
            return False
        try:
            await asyncio.wait_for(
                self._server.get_service_info(self._service_ids["runner"]),
                max(1.0, self.settings.health_interval * 2),
            )
            return True
        except Exception as exc:
            self.last_error = f"health check: {type(exc).__name__}: {exc or 'no answer in time'}"
            return False

    def _note_failure(self, exc: BaseException) -> ConnectionProblem:
        """Record why the connection failed (one line with the fix, never the token)."""
        problem = describe(exc, url=self.server_url, workspace=self.settings.effective_workspace)
        text = problem.message
        token = self._token.get_secret_value() if self._token is not None else None
        if token and token in text:
            text = text.replace(token, "**********")
        self.last_error = text[:500]
        self.state = RECONNECTING
        self.connected_since = None
        log.warning("Hypha gateway not connected: %s", self.last_error)
        return problem

    async def _supervise(self) -> None:
        """Check health; on failure tear down and reconnect with exponential backoff."""
        s = self.settings
        delay = s.reconnect_min_delay
        failures = 0
        while not self._stopping.is_set():
            if self.state == CONNECTED:
                await self._sleep(s.health_interval)
                if self._stopping.is_set():
                    return
                if await self._healthy():
                    failures = 0
                    continue
                failures += 1
                if failures < 2 and (self.embedded is None or self.embedded.running()):
                    continue
                self._note_failure(ConnectionError(self.last_error or "connection lost"))
                await self._disconnect(unregister=False)
                delay = s.reconnect_min_delay
                failures = 0
            try:
                if self.embedded is not None and not self.embedded.running():
                    log.warning("embedded Hypha server died; restarting it")
                    await self.embedded.start(s.startup_timeout)
                await asyncio.wait_for(self._connect(), s.connect_timeout)
                delay = s.reconnect_min_delay
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._note_failure(exc)
                await self._sleep(delay)
                delay = min(delay * 2, s.reconnect_max_delay)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
