"""What the operator sees when the Hypha server refuses the gateway (real server): a rejected
token or an inaccessible workspace stops `start` with one line naming the setting to change;
an unreachable server is one line naming server_url while the gateway keeps retrying."""

from __future__ import annotations

import asyncio

import pytest
from bioengine_gateway_hypha.gateway import HyphaGateway
from bioengine_gateway_hypha.settings import HyphaGatewaySettings

from bioengine_core.errors import ConfigError


async def test_a_rejected_token_stops_start_with_the_fix(
    hypha_server, backend_context, toy_service, monkeypatch
):
    monkeypatch.setenv("SITE_HYPHA_TOKEN", "not-a-token.at-all.x")
    gw = HyphaGateway(
        HyphaGatewaySettings(
            server_url=hypha_server.url, token_env="SITE_HYPHA_TOKEN", direct=False
        ),
        backend_context,
    )
    with pytest.raises(ConfigError) as refused:
        await gw.start(toy_service)
    text = str(refused.value)
    assert text.startswith(f"the Hypha server at {hypha_server.url} refused the token")
    assert "token_env / token_file" in text
    assert "\n" not in text and "Traceback" not in text and "not-a-token" not in text
    assert gw.info()["state"] == "stopped"


async def test_an_inaccessible_workspace_stops_start_with_the_fix(
    hypha_server, backend_context, toy_service
):
    gw = HyphaGateway(
        HyphaGatewaySettings(server_url=hypha_server.url, workspace="someone-else", direct=False),
        backend_context,
    )
    with pytest.raises(ConfigError) as refused:
        await gw.start(toy_service)
    text = str(refused.value)
    assert text.startswith(f"no access to workspace someone-else on {hypha_server.url}")
    assert "Only registered user can create workspace" in text
    assert "change the hypha gateway's workspace" in text
    assert "\n" not in text and "Traceback" not in text and "File " not in text


async def test_an_unreachable_server_is_one_line_naming_server_url(backend_context, toy_service):
    from bioengine_gateway_hypha.server import free_port

    url = f"http://127.0.0.1:{free_port()}"
    gw = HyphaGateway(
        HyphaGatewaySettings(server_url=url, connect_timeout=3, direct=False), backend_context
    )
    await gw.start(toy_service)  # the server may come up later: keep trying
    try:
        await asyncio.sleep(0.2)
        info = gw.info()
        assert info["state"] == "reconnecting"
        assert info["last_error"].startswith(f"no Hypha server answers at {url} (")
        assert "check the hypha gateway's server_url" in info["last_error"]
    finally:
        await gw.stop()
