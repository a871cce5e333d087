"""The Hypha gateway against a real Hypha server: what a hypha-rpc client sees."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
from bioengine_gateway_hypha.client import BioEngineClient, RemoteInferenceError
from bioengine_gateway_hypha.gateway import HyphaGateway
from bioengine_gateway_hypha.settings import HyphaGatewaySettings
from hypha_rpc import connect_to_server

pytestmark = pytest.mark.hypha

ADMIN_SECRET = "s3cret-admin-token-for-tests-0123456789"


def make_gateway(server, context, monkeypatch, **overrides) -> HyphaGateway:
    monkeypatch.setenv("TEST_HYPHA_TOKEN", server.root_token)
    monkeypatch.setenv("TEST_HYPHA_ADMIN", ADMIN_SECRET)
    options = dict(
        server_url=server.url,
        workspace="bioengine-test",
        token_env="TEST_HYPHA_TOKEN",
        admin_token_env="TEST_HYPHA_ADMIN",
        admin_users=["root"],
        health_interval=0.5,
    )
    options.update(overrides)
    return HyphaGateway(HyphaGatewaySettings(**options), context)


@pytest.fixture
async def gateway(hypha_server, backend_context, toy_service, monkeypatch):
    gw = make_gateway(hypha_server, backend_context, monkeypatch)
    await gw.start(toy_service)
    yield gw
    await gw.stop()


@pytest.fixture
async def anonymous(hypha_server):
    client = await connect_to_server({"server_url": hypha_server.url})
    yield client
    await client.disconnect()


async def test_lists_searches_and_describes_models(gateway, anonymous):
    assert gateway.info()["state"] == "connected"
    svc = await anonymous.get_service("bioengine-test/bioengine")
    models = await svc.list_models()
    assert [m["id"] for m in models] == ["double", "sum", "triple"]
    assert [m["state"] for m in models] == ["ready", "ready", "available"]
    assert models[0]["inputs"][0]["id"] == "x" and models[0]["weight_format"] == "onnx"
    found = await svc.search_models("nuclei", 5)
    assert [m["id"] for m in found] == ["double"]
    assert [m["id"] for m in await svc.search_models(["toy"], 1)] == ["double"]
    rdf = await svc.get_model_rdf("sum")
    assert rdf["id"] == "sum" and [t["id"] for t in rdf["inputs"]] == ["a", "b"]
    status = await svc.status()
    assert status["deployment"] == "toy"
    assert status["hypha"]["state"] == "connected"


async def test_infer_with_arrays_keyed_by_id_and_positional(gateway, anonymous):
    svc = await anonymous.get_service("bioengine-test/bioengine")
    a = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    b = np.ones((1, 1, 4, 4), dtype=np.float32)
    out = await svc.infer("double", {"x": a})
    assert set(out) == {"y"}
    np.testing.assert_array_equal(out["y"], a * 2)
    out = await svc.infer("sum", [a, b])
    np.testing.assert_array_equal(out["s"], a + b)
    np.testing.assert_array_equal(out["d"], a - b)
    out = await svc.infer(model_id="double", inputs=a)
    np.testing.assert_array_equal(out["y"], a * 2)
    with pytest.raises(Exception, match="unknown model 'nope'"):
        await svc.infer("nope", [a])
    with pytest.raises(Exception, match="missing input"):
        await svc.infer("sum", {"a": a})


async def test_test_reports_pass(gateway, anonymous):
    svc = await anonymous.get_service("bioengine-test/bioengine")
    report = await svc.test("double")
    assert report["passed"] is True
    assert report["outputs"]["y"]["max_abs_error"] < 1e-4


async def test_triton_client_execute_and_get_config(gateway, anonymous, toy_service):
    triton = await anonymous.get_service("bioengine-test/triton-client")
    a = np.full((1, 1, 4, 4), 3, dtype=np.float32)
    b = np.ones((1, 1, 4, 4), dtype=np.float32)
    answer = await triton.execute(
        inputs=[
            {
                "model_id": "sum",
                "inputs": [a, b],
                "return_rdf": True,
                "weight_format": "torchscript",
            }
        ],
        model_name="bioengine-model-runner",
    )
    result = answer["result"]
    assert set(result) == {"outputs", "execution_time", "success", "rdf"}
    assert result["success"] is True and result["execution_time"] >= 0
    np.testing.assert_array_equal(result["outputs"][0], a + b)  # declared output order: s, d
    np.testing.assert_array_equal(result["outputs"][1], a - b)
    assert result["rdf"]["id"] == "sum"

    answer = await triton.execute(
        inputs=[{"model_id": "double", "inputs": [a], "return_rdf": False}],
        model_name="bioengine-model-runner",
    )
    assert set(answer["result"]) == {"outputs", "execution_time", "success"}

    failed = await triton.execute(
        inputs=[{"model_id": "missing", "inputs": [a]}], model_name="bioengine-model-runner"
    )
    assert failed == {"result": {"success": False, "error": failed["result"]["error"]}}
    assert "unknown model 'missing'" in failed["result"]["error"]

    direct = await triton.execute(inputs=[a], model_name="double")
    np.testing.assert_array_equal(direct["y"], a * 2)

    config = await triton.get_config(model_name="sum")
    assert config["name"] == "sum"
    assert [t["name"] for t in config["input"]] == ["a", "b"]
    assert config["input"][0]["data_type"] == "TYPE_FP32"
    runner = await triton.get_config(model_name="bioengine-model-runner")
    assert runner["models"] == ["double", "sum"]


async def test_admin_operations_need_authorisation(gateway, anonymous, hypha_server, toy_service):
    svc = await anonymous.get_service("bioengine-test/bioengine")
    for call in (svc.load_model("folder:/models/x"), svc.unload_model("double"), svc.scale(3)):
        with pytest.raises(Exception, match="PermissionError.*anonymous callers may not"):
            await call
    with pytest.raises(Exception, match="PermissionError"):
        await svc.scale(2, admin_token="wrong")
    assert toy_service.calls == []

    # The shared admin secret authorises an anonymous connection ...
    assert await svc.scale(2, admin_token=ADMIN_SECRET) == {"replicas": 2}
    # ... and a user listed in admin_users needs nothing else.
    root = await connect_to_server(
        {"server_url": hypha_server.url, "token": hypha_server.root_token}
    )
    try:
        admin = await root.get_service("bioengine-test/bioengine")
        assert await admin.load_model("folder:/models/extra") == "extra"
        assert await admin.unload_model("extra") == {"unloaded": "extra"}
    finally:
        await root.disconnect()
    assert toy_service.calls == [
        ("scale", 2),
        ("load_model", "folder:/models/extra"),
        ("unload_model", "extra"),
    ]


async def test_protected_visibility_refuses_outsiders(
    hypha_server, backend_context, toy_service, monkeypatch, anonymous
):
    gw = make_gateway(
        hypha_server,
        backend_context,
        monkeypatch,
        workspace="bioengine-private",
        visibility="protected",
        service_id="private",
        client_id="gw-private",
    )
    await gw.start(toy_service)
    try:
        assert gw.info()["state"] == "connected"
        with pytest.raises(Exception):  # noqa: B017 - Hypha's own denial, any wording
            svc = await anonymous.get_service("bioengine-private/private")
            await svc.list_models()
    finally:
        await gw.stop()


async def test_token_never_in_info_dump_or_logs(
    hypha_server, backend_context, toy_service, monkeypatch, caplog
):
    caplog.set_level(logging.DEBUG)
    gw = make_gateway(hypha_server, backend_context, monkeypatch, client_id="gw-secret")
    await gw.start(toy_service)
    try:
        shown = repr(gw.info()) + gw.settings.model_dump_json() + repr(gw.settings)
    finally:
        await gw.stop()
    assert hypha_server.root_token not in shown
    assert ADMIN_SECRET not in shown
    assert hypha_server.root_token not in caplog.text
    assert gw.info()["state"] == "stopped"


async def test_direct_path_same_results_as_rpc(gateway, anonymous):
    svc = await anonymous.get_service("bioengine-test/bioengine")
    client = BioEngineClient(svc)
    image = np.random.default_rng(1).random((1, 1, 512, 512), dtype=np.float32)
    try:
        out = await client.infer("double", {"x": image})
        np.testing.assert_array_equal(out["y"], image * 2)
        out = await client.infer("sum", [image, image])
        np.testing.assert_array_equal(out["s"], image * 2)
        with pytest.raises(RemoteInferenceError, match="unknown model") as err:
            await client.infer("nope", [image])
        assert err.value.status == 404
        assert client.direct is True  # the direct path was used, not abandoned
        client._access["ticket"] = "expired-or-forged"  # a stale ticket is renewed once
        out = await client.infer("double", [image])
        np.testing.assert_array_equal(out["y"], image * 2)
        assert await client.list_models()  # everything else is the Hypha service
    finally:
        await client.close()
    # Without a ticket the direct endpoint refuses.
    import aiohttp

    async with aiohttp.ClientSession() as session:
        url = gateway.info()["direct_url"] + "/v1/infer/double"
        async with session.post(url, data=b"x") as resp:
            assert resp.status == 401


async def test_client_falls_back_to_rpc_without_direct_path(
    hypha_server, backend_context, toy_service, monkeypatch, anonymous
):
    gw = make_gateway(
        hypha_server, backend_context, monkeypatch, direct=False, workspace="bioengine-nodirect"
    )
    await gw.start(toy_service)
    try:
        assert "direct_url" not in gw.info()
        svc = await anonymous.get_service("bioengine-nodirect/bioengine")
        assert await svc.get_direct_access() is None
        client = BioEngineClient(svc)
        image = np.ones((1, 1, 512, 512), dtype=np.float32)
        out = await client.infer("double", [image])
        np.testing.assert_array_equal(out["y"], image * 2)
        assert client.direct is False  # remembered: later calls go straight to RPC
        await client.close()
    finally:
        await gw.stop()


async def test_unreachable_server_keeps_retrying(backend_context, toy_service):
    from bioengine_gateway_hypha.server import free_port as _free_port

    gw = HyphaGateway(
        HyphaGatewaySettings(
            server_url=f"http://127.0.0.1:{_free_port()}", connect_timeout=3, direct=False
        ),
        backend_context,
    )
    await gw.start(toy_service)
    try:
        await asyncio.sleep(0.2)
        info = gw.info()
        assert info["state"] == "reconnecting"
        assert info["last_error"]
    finally:
        await gw.stop()
    assert gw.info()["state"] == "stopped"


async def test_catalog_models_are_listed_before_and_loaded_on_first_use(
    gateway, anonymous, toy_service
):
    """In catalog mode list/search cover models not loaded yet; infer loads one first."""
    svc = await anonymous.get_service("bioengine-test/bioengine")
    found = await svc.search_models("three", 5)
    assert [(m["id"], m["state"]) for m in found] == [("triple", "available")]
    x = np.ones((1, 1, 4, 4), np.float32)
    out = await svc.infer("triple", {"x": x})
    np.testing.assert_array_equal(out["y"], x * 3)
    assert ("ensure_model", "triple") in toy_service.calls
    assert [m["state"] for m in await svc.search_models("three", 5)] == ["ready"]


async def test_an_overloaded_model_is_a_clear_error_and_the_service_keeps_serving(
    gateway, anonymous, toy_service, monkeypatch
):
    """Admission control: the engine's 429 reaches a Hypha caller as one clear error."""
    from bioengine_core.errors import OverloadedError

    async def full(model_id, inputs, *, timeout=None):
        raise OverloadedError(
            f"model '{model_id}' has 1000 requests in flight or waiting, its limit "
            "([engine] max_queue_per_model = 1000); retry shortly"
        )

    svc = await anonymous.get_service("bioengine-test/bioengine")
    x = np.ones((1, 1, 4, 4), np.float32)
    with monkeypatch.context() as m:
        m.setattr(toy_service, "infer", full)
        with pytest.raises(Exception) as info:
            await svc.infer("double", {"x": x})
    assert "max_queue_per_model" in str(info.value) and "retry shortly" in str(info.value)
    assert "Traceback" not in str(info.value)
    out = await svc.infer("double", {"x": x})
    np.testing.assert_array_equal(out["y"], x * 2)
