"""End-to-end: `bioengine serve` with an embedded Hypha server and the real unet2d_nuclei_broad.

A hypha-rpc client in this (other) process lists the models, reproduces the model's test output
through `infer` and the triton-client `execute`, and `test()` passes; `bioengine status` shows
the Hypha gateway connected.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from bioengine_gateway_hypha.client import BioEngineClient
from bioengine_gateway_hypha.server import hypha_installed
from core_helpers import Serve, free_port
from hypha_rpc import connect_to_server

from bioengine_core.testing.pytest_plugin import require_service

pytestmark = [pytest.mark.hypha, pytest.mark.triton]

ROOT = Path(__file__).resolve().parents[3]
MODEL = ROOT / "models" / "unet2d_nuclei_broad"
MODEL_ID = "unet2d_nuclei_broad"
BIN = Path(sys.executable).parent
ADMIN = "e2e-admin-secret-abcdefghijklmnopqrstuvwxyz"


def _triton_available() -> bool:
    try:
        from bioengine_core.triton import find_triton

        find_triton()
        return True
    except Exception:
        return False


def write_config(tmp: Path, *, http_port: int, hypha_port: int = 0, hypha: str = "") -> Path:
    """A site config: local executor, HTTP gateway, and a Hypha gateway (embedded by default)."""
    hypha = hypha or f"embedded = true\nport = {hypha_port}\nhealth_interval = 1.0"
    text = f"""
[engine]
name = "hypha-e2e"
state_dir = "{tmp / "state"}"
replicas = 1
health_interval = 0.5
stop_grace = 5

[executor]
kind = "local"
mode = "process"

[storage]
kind = "local"

[gateways.http]
kind = "http"
port = {http_port}

[gateways.hypha]
kind = "hypha"
{hypha}
admin_token_env = "E2E_HYPHA_ADMIN"

[[models]]
source = "folder:{MODEL}"
"""
    path = tmp / "site.toml"
    path.write_text(text)
    return path


def ServeProcess(config: Path, env: dict[str, str] | None = None) -> Serve:  # noqa: N802
    """`bioengine serve` with the admin secret this module's config refers to."""
    return Serve(config, env={"E2E_HYPHA_ADMIN": ADMIN, **(env or {})})


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    require_service(hypha_installed(), "the Hypha server package (hypha[s3])")
    require_service(_triton_available(), "the tritonserver binary (nvidia-pytriton)")
    tmp = tmp_path_factory.mktemp("hypha-e2e")
    http_port, hypha_port = free_port(), free_port()
    config = write_config(tmp, http_port=http_port, hypha_port=hypha_port)
    serve = ServeProcess(config)
    try:
        serve.wait_serving()
        yield {
            "hypha": f"http://127.0.0.1:{hypha_port}",
            "http": f"http://127.0.0.1:{http_port}",
            "config": config,
            "serve": serve,
        }
    finally:
        code = serve.stop()
        print(serve.output)
        assert code == 0, serve.output


@pytest.fixture
async def client(served):
    server = await connect_to_server({"server_url": served["hypha"]})
    yield server
    await server.disconnect()


async def test_lists_infers_and_tests_the_real_model(served, client):
    svc = await client.get_service("bioengine/bioengine")
    models = await svc.list_models()
    assert [m["id"] for m in models] == [MODEL_ID]
    x = np.load(MODEL / "test_input.npy")
    y = np.load(MODEL / "test_output.npy")
    tensor_in = models[0]["inputs"][0]["id"]
    tensor_out = models[0]["outputs"][0]["id"]
    out = await svc.infer(MODEL_ID, {tensor_in: x})
    np.testing.assert_allclose(out[tensor_out], y, atol=1e-4, rtol=1e-4)
    out = await svc.infer(MODEL_ID, [x])
    np.testing.assert_allclose(out[tensor_out], y, atol=1e-4, rtol=1e-4)
    report = await svc.test(MODEL_ID)
    assert report["passed"] is True, report
    judged = report["outputs"][tensor_out]
    assert report["weight_format"] == "onnx" and judged["mismatched_elements"] == 0
    assert judged["max_abs_error"] < 1e-4 and judged["elements"] == y.size
    assert judged["tolerance"]["source"] == "bioimageio.spec default"
    assert (await svc.get_model_rdf(MODEL_ID))["name"]
    # an image of another size is tiled by the engine, as over HTTP
    big = np.tile(x, (1, 1, 2, 2))[:, :, :600, :700]
    out = await svc.infer(MODEL_ID, {tensor_in: big})
    assert out[tensor_out].shape == (1, 1, 600, 700)


async def test_triton_client_execute_as_existing_clients_send_it(served, client):
    triton = await client.get_service("bioengine/triton-client")
    x = np.load(MODEL / "test_input.npy")
    y = np.load(MODEL / "test_output.npy")
    answer = await triton.execute(
        inputs=[{"model_id": MODEL_ID, "inputs": [x], "return_rdf": True, "weight_format": None}],
        model_name="bioengine-model-runner",
    )
    result = answer["result"]
    assert result["success"] is True, result
    np.testing.assert_allclose(result["outputs"][0], y, atol=1e-4, rtol=1e-4)
    assert result["execution_time"] > 0 and result["rdf"]["name"]
    direct = await triton.execute(inputs=[x], model_name=MODEL_ID)
    np.testing.assert_allclose(next(iter(direct.values())), y, atol=1e-4, rtol=1e-4)


async def test_direct_path_reproduces_the_test_output(served, client):
    engine = BioEngineClient(await client.get_service("bioengine/bioengine"))
    try:
        x = np.load(MODEL / "test_input.npy")
        out = await engine.infer(MODEL_ID, [x])
        np.testing.assert_allclose(
            next(iter(out.values())), np.load(MODEL / "test_output.npy"), atol=1e-4, rtol=1e-4
        )
        assert engine.direct is True
    finally:
        await engine.close()


async def test_administration_needs_authorisation(served, client):
    svc = await client.get_service("bioengine/bioengine")
    with pytest.raises(Exception, match="PermissionError"):
        await svc.scale(2)
    with pytest.raises(Exception, match="PermissionError"):
        await svc.unload_model(MODEL_ID)
    assert [m["id"] for m in await svc.list_models()] == [MODEL_ID]
    # The operator's admin secret authorises the same call.
    assert await svc.scale(1, admin_token=ADMIN) == {"replicas": 1}


def test_bioengine_status_shows_the_hypha_gateway(served):
    result = subprocess.run(
        [str(BIN / "bioengine"), "status", "--url", served["http"], "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    import json

    hypha = json.loads(result.stdout)["gateways"]["hypha"]
    assert hypha["kind"] == "hypha" and hypha["state"] == "connected"
    assert hypha["url"] == served["hypha"]
    assert hypha["services"]["bioengine-model-runner"] == "bioengine/bioengine"


def _hypha_state(http: str) -> str:
    import json
    import urllib.request

    with urllib.request.urlopen(f"{http}/bioengine/status", timeout=10) as resp:
        return json.loads(resp.read())["gateways"]["hypha"]["state"]


async def _list_until(url: str, service_id: str, deadline: float) -> list:
    import asyncio

    last: Exception | None = None
    while time.monotonic() < deadline:
        server = None
        try:
            server = await asyncio.wait_for(connect_to_server({"server_url": url}), 5)
            svc = await asyncio.wait_for(server.get_service(service_id), 5)
            return await asyncio.wait_for(svc.list_models(), 5)
        except Exception as exc:
            last = exc
            await asyncio.sleep(0.5)
        finally:
            if server is not None:
                try:
                    await asyncio.wait_for(server.disconnect(), 3)
                except Exception:
                    pass
    raise AssertionError(f"not callable before the deadline: {last}")


async def test_proxy_mode_survives_a_hypha_restart(fresh_hypha_server, tmp_path):
    """serve registers on a separately started Hypha; after its restart, callable in < 30 s."""
    require_service(_triton_available(), "the tritonserver binary (nvidia-pytriton)")
    http_port = free_port()
    hypha = (
        f'server_url = "{fresh_hypha_server.url}"\nworkspace = "proxy-site"\n'
        'token_env = "E2E_HYPHA_TOKEN"\nhealth_interval = 0.5\nreconnect_max_delay = 2'
    )
    config = write_config(tmp_path, http_port=http_port, hypha=hypha)
    serve = ServeProcess(config, env={"E2E_HYPHA_TOKEN": fresh_hypha_server.root_token})
    http = f"http://127.0.0.1:{http_port}"
    try:
        serve.wait_serving()
        models = await _list_until(
            fresh_hypha_server.url, "proxy-site/bioengine", time.monotonic() + 20
        )
        assert [m["id"] for m in models] == [MODEL_ID]
        assert _hypha_state(http) == "connected"

        fresh_hypha_server.stop()
        deadline = time.monotonic() + 20
        while _hypha_state(http) != "reconnecting":
            assert time.monotonic() < deadline, "status never showed the lost connection"
            time.sleep(0.3)

        import asyncio

        await asyncio.to_thread(fresh_hypha_server.start)
        restarted = time.monotonic()
        models = await _list_until(fresh_hypha_server.url, "proxy-site/bioengine", restarted + 30)
        print(f"callable again {time.monotonic() - restarted:.1f} s after the Hypha restart")
        assert [m["id"] for m in models] == [MODEL_ID]
        assert _hypha_state(http) == "connected"
        assert serve.proc.poll() is None  # the same serve process, never restarted
    finally:
        code = serve.stop()
        print(serve.output)
    assert code == 0
