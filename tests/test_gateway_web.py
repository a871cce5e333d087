"""The web page's routes without a browser (issue #13): uploads are decoded and fitted to the
model's input axes or refused with a 400 naming model, input and axis; the page's own files
need no token while its model routes need the inference role; bodies are bounded (413) and
broken files never answer 5xx.

`fit`/`decode` directly, and the real `HttpGateway` app over real sockets with the small
in-process service from test_http_cors (no replicas needed).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import urllib.error
import urllib.request

import numpy as np
import pytest
from test_http_cors import ToyService

from bioengine_core.contracts import BackendContext
from bioengine_core.errors import InferenceError
from bioengine_core.gateway_http import HttpGatewaySettings
from bioengine_core.gateway_http_app import HttpGateway
from bioengine_core.gateway_web import decode, fit

BCYX = {"id": "raw", "dtype": "float32", "shape": [-1, 1, 512, 512],
        "axes": ["batch", "channel", "y", "x"]}  # fmt: skip
BCZYX = {"id": "vol", "dtype": "float32", "shape": [-1, 2, -1, -1, -1],
         "axes": ["batch", "channel", "z", "y", "x"]}  # fmt: skip
TOKEN = "inf-" + "web0123456789abcdef0"


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_2d_greyscale_becomes_batch_and_channel():
    image = np.arange(512 * 512, dtype=np.uint16).reshape(512, 512)
    for data in (npy(image), png(image.astype(np.uint8))):
        arr, kind = decode(data)
        out = fit(arr, kind, "m", BCYX)
        assert out.shape == (1, 1, 512, 512) and out.dtype == np.float32


def test_tiff_2d_and_full_shape():
    import tifffile  # a dependency: never skipped

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.ones((512, 512), np.float32))
    arr, kind = decode(buf.getvalue())
    assert kind == "tiff" and fit(arr, kind, "m", BCYX).shape == (1, 1, 512, 512)
    assert fit(np.ones((1, 1, 512, 512)), "npy", "m", BCYX).shape == (1, 1, 512, 512)
    assert fit(np.ones((1, 512, 512)), "npy", "m", BCYX).shape == (1, 1, 512, 512)


def test_rgb_for_one_channel_model_names_model_input_axis():
    arr, kind = decode(png(np.zeros((512, 512, 3), np.uint8)))
    with pytest.raises(InferenceError) as info:
        fit(arr, kind, "unet", BCYX)
    text = str(info.value)
    assert info.value.status == 400
    assert "'unet'" in text and "'raw'" in text and "'channel'" in text and "3 (RGB)" in text


def test_3d_stack_with_channels_first_and_wrong_sizes():
    out = fit(np.ones((2, 5, 8, 9)), "tiff", "v", BCZYX)  # c,z,y,x
    assert out.shape == (1, 2, 5, 8, 9)
    with pytest.raises(InferenceError, match="wants 2 channels on axis 'channel'; the image has 1"):
        fit(np.ones((5, 8, 9)), "tiff", "v", BCZYX)
    with pytest.raises(InferenceError, match="wants size 1 on axis 'channel'; the image has 3"):
        fit(np.ones((1, 3, 512, 512)), "npy", "m", BCYX)
    # other sizes are left to the service, which tiles images of any size
    assert fit(np.ones((512, 700)), "npy", "m", BCYX).shape == (1, 1, 512, 700)
    with pytest.raises(InferenceError, match="cannot be matched"):
        fit(np.ones((3,)), "npy", "m", BCYX)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"GIF89a",
        b"\x93NUMPY\x01\x00\xff\xff{",
        npy(np.array(["a", "b"])),
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 40,
        b"II*\x00" + b"\xff" * 40,
        b"MM\x00*" + b"\x00" * 4,
    ],
)
def test_broken_files_are_400(data):
    with pytest.raises(InferenceError) as info:
        decode(data)
    assert info.value.status == 400


def test_pickles_are_refused():
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InferenceError, match="cannot be read"):
        decode(buf.getvalue())


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("webgw")
    os.environ["BIOENGINE_TEST_WEB_TOKEN"] = TOKEN
    settings = HttpGatewaySettings(
        port=0,
        max_request_bytes=64 * 1024,
        tokens=[{"role": "inference", "env": "BIOENGINE_TEST_WEB_TOKEN"}],
    )
    gw = HttpGateway(settings, BackendContext(deployment="w", state_dir=tmp, config_dir=tmp))
    loop = asyncio.new_event_loop()
    loop.run_until_complete(gw.start(ToyService()))
    import threading

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield gw.url
    asyncio.run_coroutine_threadsafe(gw.stop(), loop).result(20)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def call(url: str, method: str = "GET", body: bytes | None = None, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_page_files_need_no_token_and_have_a_strict_policy(url):
    status, headers, body = call(url + "/")
    assert status == 200 and b"/web/app.js" in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    for name in ("app.js", "style.css"):
        assert call(f"{url}/web/{name}")[0] == 200
    for name in ("../gateway_web.py", "%2e%2e%2fgateway_web.py", "nope.js", "index.html.bak"):
        assert call(f"{url}/web/{name}")[0] == 404


def test_page_routes_need_the_inference_role(url):
    image = npy(np.ones((1, 1, 4, 4), np.float32))
    for method, path, body in [
        ("POST", "/bioengine/models/toy/try", image),
        ("POST", "/bioengine/models/toy/test", b""),
        ("GET", "/bioengine/models/toy/sample", None),
    ]:
        assert call(url + path, method, body)[0] == 401
    status, headers, body = call(url + "/bioengine/models/toy/try", "POST", image, TOKEN)
    assert status == 200 and headers["X-Output-Id"] == "y"
    np.testing.assert_array_equal(np.load(io.BytesIO(body)), np.full((1, 1, 4, 4), 2.0))
    status, _, body = call(url + "/bioengine/models/toy/test", "POST", b"", TOKEN)
    assert status == 200 and json.loads(body)["passed"] is True
    status, _, body = call(url + "/bioengine/models/toy/sample", token=TOKEN)
    assert status == 404 and "no sample inputs" in json.loads(body)["error"]
    status, _, body = call(url + "/bioengine/models/nope/try", "POST", image, TOKEN)
    assert status == 404


def test_try_bounds_the_body_and_never_answers_5xx(url):
    status, _, body = call(url + "/bioengine/models/toy/try", "POST", b"x" * 70_000, TOKEN)
    assert status == 413 and "max_request_bytes" in json.loads(body)["error"]
    for data in (b"", b"junk", npy(np.array([1 + 2j])), npy(np.ones((2, 3, 4, 5, 6)))):
        status, _, body = call(url + "/bioengine/models/toy/try", "POST", data, TOKEN)
        assert 400 <= status < 500, (data[:20], status, body)
        assert "error" in json.loads(body)
