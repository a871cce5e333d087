"""CORS on the HTTP gateway (issue #13): only origins in `[gateways.http] cors_origins` get CORS
headers, echoed exactly (never `*`); preflights from other origins, for other methods or
headers, or from `null`, are refused without them; header injection through Origin goes nowhere.

The real `HttpGateway` app over real sockets, with a small in-process `Service` behind it (no
replicas needed: CORS is the gateway's own business). Raw `http.client` so nothing normalises
what is sent.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest

from bioengine_core.config import load_config
from bioengine_core.contracts import BackendContext, ModelInfo, Service
from bioengine_core.errors import ConfigError, ModelNotFoundError
from bioengine_core.gateway_http import HttpGatewaySettings
from bioengine_core.gateway_http_app import HttpGateway

ALLOWED = "https://lab.example.org"
OTHER_PORT = "http://127.0.0.1:8765"
TOKEN = "inf-" + "0123456789abcdef0123"


class ToyService(Service):
    """One model that doubles its input."""

    info = ModelInfo(
        id="toy",
        name="toy",
        description="doubles",
        inputs=[{"id": "x", "dtype": "float32", "shape": [-1, 1, -1, -1],
                 "axes": ["batch", "channel", "y", "x"]}],
        outputs=[{"id": "y", "dtype": "float32", "shape": [-1, 1, -1, -1],
                  "axes": ["batch", "channel", "y", "x"]}],
        weight_format="onnx",
    )  # fmt: skip

    def list_models(self):
        return [self.info]

    def model_ids(self):
        return ["toy"]

    async def ensure_model(self, model_id):
        if model_id != "toy":
            raise ModelNotFoundError(model_id, ["toy"])

    def get_model(self, model_id):
        return {"name": "toy"}

    def check_inputs(self, model_id, specs):
        pass

    def would_time_out(self, model_id, timeout):
        return False

    async def infer(self, model_id, inputs, *, timeout=None):
        return {"y": np.asarray(next(iter(inputs.values()))) * 2}

    async def infer_raw(self, model_id, body, headers, *, timeout=None):
        return 200, b"{}", {}

    async def triton_get(self, model_id, what="metadata", *, version=None):
        return 200, b"{}"

    async def test_model(self, model_id):
        return {"model_id": model_id, "passed": True, "outputs": {}}

    def ready_replicas(self):
        return 1

    def metrics_text(self):
        return b""

    def status(self):
        return {"replicas": [], "models": []}

    async def load_model(self, ref, *, model_id=None):
        return "toy"

    async def unload_model(self, model_id):
        pass

    async def scale(self, replicas):
        pass


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """(host, port) of a running gateway with tokens and one allowed origin."""
    import os

    tmp = tmp_path_factory.mktemp("cors")
    os.environ["BIOENGINE_TEST_CORS_TOKEN"] = TOKEN
    settings = HttpGatewaySettings(
        port=0,
        cors_origins=[ALLOWED, "http://localhost:3000"],
        tokens=[{"role": "inference", "env": "BIOENGINE_TEST_CORS_TOKEN"}],
    )
    context = BackendContext(
        deployment="cors", state_dir=tmp, config_dir=tmp, logger=logging.getLogger("t")
    )
    gw = HttpGateway(settings, context)
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run():
        asyncio.set_event_loop(loop)
        loop.run_until_complete(gw.start(ToyService()))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(20)
    host, port = gw.url.split("://")[1].rsplit(":", 1)
    yield host, int(port)
    asyncio.run_coroutine_threadsafe(gw.stop(), loop).result(20)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def send(gateway, method: str, path: str, headers: dict[str, str], body: bytes | None = None):
    """(status, lower-cased headers, body) of one request over a fresh connection."""
    conn = http.client.HTTPConnection(*gateway, timeout=20)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def preflight(gateway, origin: str, method: str = "POST", asked: str = "authorization"):
    return send(
        gateway,
        "OPTIONS",
        "/v2/models/toy/infer",
        {
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": asked,
        },
    )


def test_preflight_from_allowed_origin(gateway):
    status, headers, _ = preflight(
        gateway, ALLOWED, asked="Authorization, Content-Type, Inference-Header-Content-Length"
    )
    assert status == 204
    assert headers["access-control-allow-origin"] == ALLOWED
    assert set(headers["access-control-allow-methods"].replace(" ", "").split(",")) == {
        "GET",
        "POST",
    }
    allowed = {h.strip().lower() for h in headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "inference-header-content-length"} <= allowed
    assert headers["vary"] == "Origin"
    assert "access-control-allow-credentials" not in headers


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.example.org",
        "null",
        "https://lab.example.org.evil.org",
        "https://lab.example.org:8443",
        "http://lab.example.org",
        "HTTPS://LAB.EXAMPLE.ORG",
        "https://lab.example.org/",
        "*",
        "",
    ],
)
def test_preflight_from_other_origins_gets_no_cors_headers(gateway, origin):
    status, headers, body = preflight(gateway, origin)
    assert status == 403, (origin, status)
    assert not [h for h in headers if h.startswith("access-control-")], headers
    assert "error" in json.loads(body)


@pytest.mark.parametrize(
    ("method", "asked"),
    [("DELETE", "authorization"), ("PUT", ""), ("POST", "x-evil"), ("POST", "cookie")],
)
def test_preflight_for_disallowed_method_or_header_is_refused(gateway, method, asked):
    status, headers, _ = preflight(gateway, ALLOWED, method, asked)
    assert status == 403
    assert "access-control-allow-origin" not in headers


def test_answers_to_allowed_origin_are_readable_and_name_exposed_headers(gateway):
    status, headers, body = send(
        gateway, "GET", "/bioengine/models", {"Origin": ALLOWED, "Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200 and json.loads(body)[0]["id"] == "toy"
    assert headers["access-control-allow-origin"] == ALLOWED
    exposed = {h.strip().lower() for h in headers["access-control-expose-headers"].split(",")}
    assert {"inference-header-content-length", "retry-after"} <= exposed
    assert headers["vary"] == "Origin"
    # errors (here: no token) are readable by the allowed page too, so it can show them
    status, headers, body = send(gateway, "GET", "/bioengine/models", {"Origin": ALLOWED})
    assert status == 401 and headers["access-control-allow-origin"] == ALLOWED


@pytest.mark.parametrize(
    "origin",
    ["https://evil.example.org", "null", ALLOWED + "\tx", ALLOWED + ", https://evil.example.org"],
)
def test_answers_to_other_origins_carry_no_cors_headers(gateway, origin):
    status, headers, _ = send(
        gateway, "GET", "/bioengine/models", {"Origin": origin, "Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 200
    assert not [h for h in headers if h.startswith("access-control-")], headers
    assert headers["vary"] == "Origin"  # caches must not hand this answer to another origin


def test_injected_origin_never_reaches_the_answer(gateway):
    """An Origin value carrying CR/LF (or an encoded one) never becomes a header."""
    import socket

    with socket.create_connection(gateway, timeout=20) as sock:
        sock.sendall(
            b"OPTIONS /bioengine/models HTTP/1.1\r\nHost: x\r\n"
            b"Origin: https://lab.example.org\rSet-Cookie: a=b\r\n"
            b"Access-Control-Request-Method: GET\r\n\r\n"
        )
        raw = sock.recv(65536)
    assert raw.startswith((b"HTTP/1.1 4", b"HTTP/1.0 4")), raw[:100]
    head = raw.split(b"\r\n\r\n", 1)[0].lower()  # aiohttp quotes the bad line in its body
    assert b"set-cookie" not in head and b"access-control-allow-origin" not in head
    status, headers, _ = preflight(gateway, "https://lab.example.org%0d%0aSet-Cookie:%20a=b")
    assert status == 403 and "set-cookie" not in headers


def test_no_cors_headers_without_an_allow_list(tmp_path):
    gw = HttpGateway(
        HttpGatewaySettings(port=0),
        BackendContext(deployment="c", state_dir=tmp_path, config_dir=tmp_path),
    )

    async def main():
        await gw.start(ToyService())
        try:
            host, port = gw.url.split("://")[1].rsplit(":", 1)
            return await asyncio.to_thread(
                lambda: (
                    preflight((host, int(port)), ALLOWED),
                    send((host, int(port)), "GET", "/bioengine/models", {"Origin": ALLOWED}),
                )
            )
        finally:
            await gw.stop()

    (pstatus, pheaders, _), (status, headers, _) = asyncio.run(main())
    assert pstatus == 403 and status == 200
    for h in (pheaders, headers):
        assert not [k for k in h if k.startswith("access-control-")]
        assert "vary" not in h


@pytest.mark.parametrize(
    "value",
    [
        "*",
        "null",
        "https://lab.example.org/",
        "https://lab.example.org/path",
        "https://Lab.example.org",
        "https://lab.example.org:443",
        "ftp://lab.example.org",
        "https://user@lab.example.org",
        "lab.example.org",
        "https://lab.example.org\r\nX: y",
    ],
)
def test_bad_origin_in_config_names_the_key(tmp_path: Path, value: str):
    cfg = tmp_path / "site.toml"
    cfg.write_text(f"[gateways.http]\ncors_origins = [{json.dumps(value)}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert "[gateways.http] key 'cors_origins'" in str(info.value)


def test_good_origins_pass_config(tmp_path: Path):
    cfg = tmp_path / "site.toml"
    cfg.write_text(
        '[gateways.http]\ncors_origins = ["https://bioimage.io", "http://localhost:8080"]\n'
    )
    config = load_config(cfg)
    assert config.gateways["http"].settings.cors_origins == [
        "https://bioimage.io",
        "http://localhost:8080",
    ]
