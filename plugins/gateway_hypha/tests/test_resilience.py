"""Surviving the network (proxy mode) and the embedded server's life cycle (all-in-one mode)."""

from __future__ import annotations

import asyncio
import socket
import time

import numpy as np
import pytest
from bioengine_gateway_hypha.gateway import HyphaGateway
from bioengine_gateway_hypha.settings import HyphaGatewaySettings
from hypha_rpc import connect_to_server

pytestmark = pytest.mark.hypha


async def _call_until_ok(url: str, service_id: str, deadline: float) -> list:
    """Connect anonymously and list models, retrying until it works or `deadline` passes."""
    last: Exception | None = None
    while time.monotonic() < deadline:
        client = None
        try:
            client = await asyncio.wait_for(connect_to_server({"server_url": url}), 5)
            svc = await asyncio.wait_for(client.get_service(service_id), 5)
            return await asyncio.wait_for(svc.list_models(), 5)
        except Exception as exc:  # not back yet
            last = exc
            await asyncio.sleep(0.5)
        finally:
            if client is not None:
                try:
                    await asyncio.wait_for(client.disconnect(), 3)
                except Exception:
                    pass
    raise AssertionError(f"service not callable before the deadline: {last}")


async def test_restarted_server_gets_the_services_back(
    fresh_hypha_server, backend_context, toy_service, monkeypatch
):
    monkeypatch.setenv("RESTART_TOKEN", fresh_hypha_server.root_token)
    gw = HyphaGateway(
        HyphaGatewaySettings(
            server_url=fresh_hypha_server.url,
            workspace="bioengine-restart",
            token_env="RESTART_TOKEN",
            health_interval=0.5,
            reconnect_max_delay=2,
        ),
        backend_context,
    )
    await gw.start(toy_service)
    try:
        assert gw.info()["state"] == "connected"
        await _call_until_ok(
            fresh_hypha_server.url, "bioengine-restart/bioengine", time.monotonic() + 10
        )

        fresh_hypha_server.stop()
        seen = set()
        for _ in range(150):
            seen.add(gw.info()["state"])
            if "reconnecting" in seen:
                break
            await asyncio.sleep(0.1)
        assert "reconnecting" in seen

        restarted = time.monotonic()
        await asyncio.to_thread(fresh_hypha_server.start)
        models = await _call_until_ok(
            fresh_hypha_server.url, "bioengine-restart/bioengine", restarted + 30
        )
        assert [m["id"] for m in models] == ["double", "sum", "triple"]
        elapsed = time.monotonic() - restarted
        assert elapsed < 30
        info = gw.info()
        assert info["state"] == "connected" and info["reconnects"] >= 1

        client = await connect_to_server({"server_url": fresh_hypha_server.url})
        try:
            triton = await client.get_service("bioengine-restart/triton-client")
            a = np.ones((1, 1, 4, 4), dtype=np.float32)
            answer = await triton.execute(
                inputs=[{"model_id": "double", "inputs": [a]}], model_name="bioengine-model-runner"
            )
            assert answer["result"]["success"] is True
        finally:
            await client.disconnect()
    finally:
        await gw.stop()


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def test_embedded_server_starts_serves_and_stops_with_the_gateway(
    backend_context, toy_service
):
    from bioengine_gateway_hypha.server import hypha_installed

    from bioengine_core.testing.pytest_plugin import require_service

    require_service(hypha_installed(), "the Hypha server package (hypha[s3])")
    gw = HyphaGateway(HyphaGatewaySettings(embedded=True, health_interval=0.5), backend_context)
    await gw.start(toy_service)
    try:
        info = gw.info()
        assert info["mode"] == "embedded" and info["state"] == "connected"
        assert info["url"].startswith("http://127.0.0.1:")
        assert info["services"]["bioengine-model-runner"] == "bioengine/bioengine"
        port = gw.embedded.port
        assert _port_open(port)
        client = await connect_to_server({"server_url": info["url"]})
        try:
            svc = await client.get_service("bioengine/bioengine")
            out = await svc.infer("double", [np.ones((1, 1, 2, 2), dtype=np.float32)])
            np.testing.assert_array_equal(out["y"], 2)
        finally:
            await client.disconnect()
        assert (backend_context.state_dir / "hypha" / "server.log").exists()
        # No permessage-deflate: tensors do not compress, and deflate made transfers ~10x slower.
        import websockets

        ws_url = info["url"].replace("http://", "ws://") + "/ws"
        async with websockets.connect(ws_url) as ws:  # offers deflate, as hypha-rpc does
            assert ws.response.headers.get("Sec-WebSocket-Extensions") is None
        # The operator's command line shows no secret: the root token travels in the env.
        assert gw.embedded.root_token not in " ".join(gw.embedded.command())
        pid = gw.embedded.process.pid
    finally:
        await gw.stop()
    assert gw.info()["state"] == "stopped"
    assert not _port_open(port)
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(pid, 0)


async def test_embedded_server_that_cannot_start_is_reported_with_its_log(
    backend_context, toy_service
):
    from bioengine_gateway_hypha.server import HyphaServerError, hypha_installed

    from bioengine_core.testing.pytest_plugin import require_service

    require_service(hypha_installed(), "the Hypha server package (hypha[s3])")
    gw = HyphaGateway(
        HyphaGatewaySettings(embedded=True, server_args=["--no-such-option"]), backend_context
    )
    with pytest.raises(HyphaServerError, match=r"(?s)exited with code 2.*no-such-option"):
        await gw.start(toy_service)
    assert gw.info()["state"] == "stopped"
    assert not gw.embedded.running()


async def test_embedded_server_that_dies_is_restarted(backend_context, toy_service):
    import os
    import signal

    from bioengine_gateway_hypha.server import hypha_installed

    from bioengine_core.testing.pytest_plugin import require_service

    require_service(hypha_installed(), "the Hypha server package (hypha[s3])")
    gw = HyphaGateway(HyphaGatewaySettings(embedded=True, health_interval=0.5), backend_context)
    await gw.start(toy_service)
    try:
        first = gw.info()["server_pid"]
        os.kill(first, signal.SIGKILL)
        killed = time.monotonic()
        models = await _call_until_ok(gw.info()["url"], "bioengine/bioengine", killed + 60)
        assert [m["id"] for m in models] == ["double", "sum", "triple"]
        info = gw.info()
        assert info["server_pid"] != first and info["state"] == "connected"
    finally:
        await gw.stop()
