"""The web page (issue #13) in a real browser: Playwright driving Debian's Chromium against
`bioengine serve` with two real Triton replicas of unet2d_nuclei_broad.

The page lists the model; the model's test input uploaded as `.npy` and as a TIFF gives an
output that, read back through the page's own download, equals the test output within 1e-4; the
test button shows "passed"; an RGB PNG for this one-channel model shows a clear error and the
page keeps working; the status view shows both replicas, and a new one in place of a replica
whose Triton is killed during the test. Each view is screenshotted at 1280x800
and 390x844 under the pytest tmp dir, and each screenshot must not be blank.

Needs `apt-get install -y chromium` and `pip install playwright` (no `playwright install`): in CI
a missing browser fails the test (`.ci/install-chromium.sh` installs it), locally it skips.
"""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from core_helpers import ROOT, Serve, free_port, local_config, triton_available

from bioengine_core.testing.pytest_plugin import require_service

pytestmark = pytest.mark.triton

MODEL = ROOT / "models" / "unet2d_nuclei_broad"
MODEL_ID = "unet2d_nuclei_broad"
X = np.load(MODEL / "test_input.npy")
Y = np.load(MODEL / "test_output.npy")
SIZES = {"wide": (1280, 800), "phone": (390, 844)}


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, state dir) of `bioengine serve` with two replicas."""
    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    tmp = tmp_path_factory.mktemp("web")
    port = free_port()
    serve = Serve(local_config(tmp, port=port, replicas=2, name="e2e-web"))
    try:
        serve.wait_serving()
        yield f"http://127.0.0.1:{port}", tmp / "state"
    finally:
        assert serve.stop() == 0, serve.output[-3000:]


@pytest.fixture(scope="module")
def site(served):
    return served[0]


def triton_pids(state: Path) -> list[int]:
    """Tritonserver processes serving the repository under `state`."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        argv = proc.info["cmdline"] or []
        if argv and argv[0].endswith("tritonserver") and str(state) in " ".join(argv):
            pids.append(proc.info["pid"])
    return pids


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    require_service(sync_playwright is not None, "playwright (pip install playwright)")
    exe = chromium()
    require_service(exe is not None, "Debian's chromium (apt-get install -y chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def page(browser, site):
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(site + "/")
    pg.wait_for_selector(f'li.card[data-model="{MODEL_ID}"]')
    yield pg
    context.close()
    assert not errors, errors


def screenshots(page, tmp_path: Path, view: str) -> None:
    """Screenshots of the current view at both sizes; each must show more than one colour."""
    from PIL import Image

    for label, (w, h) in SIZES.items():
        page.set_viewport_size({"width": w, "height": h})
        path = tmp_path / f"{view}-{label}.png"
        page.screenshot(path=str(path), full_page=False)
        with Image.open(path) as img:
            colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colours is None or len(colours) > 8, f"{path} looks blank"
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= w + 1, f"{view} at {w}x{h} scrolls sideways ({width} px)"
    page.set_viewport_size({"width": 1280, "height": 800})


def downloaded(page) -> np.ndarray:
    with page.expect_download() as info:
        page.click("#download")
    return np.load(info.value.path(), allow_pickle=False)


def run_upload(page, path: Path) -> np.ndarray:
    page.click('nav button[data-view="try"]')
    page.select_option("#try-model", MODEL_ID)
    page.set_input_files("#upload", str(path))
    page.wait_for_selector("#download:not([disabled])", timeout=120_000)
    return downloaded(page)


def test_models_view_lists_the_model_and_searches(page, tmp_path):
    card = page.locator(f'li.card[data-model="{MODEL_ID}"]')
    assert "raw" in card.inner_text() and "batch" in card.inner_text()
    card.get_by_role("button", name="Details").click()
    card.locator(".details").wait_for()
    assert "Constantin Pape" in card.inner_text() and "MIT" in card.inner_text()
    screenshots(page, tmp_path, "models")
    page.fill("#search", "no-such-model-words")
    page.keyboard.press("Enter")
    page.wait_for_selector("text=No model matches.")
    page.fill("#search", "nuclei")
    page.keyboard.press("Enter")
    page.wait_for_selector(f'li.card[data-model="{MODEL_ID}"]')


def test_try_npy_and_tiff_match_the_test_output(page, tmp_path):
    out = run_upload(page, MODEL / "test_input.npy")
    np.testing.assert_allclose(out, Y, atol=1e-4, rtol=0)
    screenshots(page, tmp_path, "try")
    # the controls redraw without errors: colormap, contrast, overlay
    page.select_option("#cmap", "viridis")
    page.fill("#contrast", "50")
    page.fill("#overlay", "60")
    import tifffile  # a dependency: never skipped

    tif = tmp_path / "input.tif"
    tifffile.imwrite(tif, X[0, 0])  # a plain 2D image: the gateway maps it onto b,c,y,x
    page.reload()
    page.wait_for_selector(f'li.card[data-model="{MODEL_ID}"]')
    out = run_upload(page, tif)
    np.testing.assert_allclose(out, Y, atol=1e-4, rtol=0)
    with page.expect_download() as info:  # the result as TIFF, written by the page
        page.click("#download-tiff")
    as_tiff = tifffile.imread(info.value.path())
    np.testing.assert_allclose(as_tiff, Y[0, 0], atol=1e-4, rtol=0)


def test_sample_button_runs_the_models_test_input(page):
    page.click('nav button[data-view="try"]')
    page.select_option("#try-model", MODEL_ID)
    page.click("#use-sample")
    page.wait_for_selector("#download:not([disabled])", timeout=120_000)
    np.testing.assert_allclose(downloaded(page), Y, atol=1e-4, rtol=0)


def test_rgb_png_is_a_clear_error_and_the_page_keeps_working(page, tmp_path):
    from PIL import Image

    rgb = np.zeros((512, 512, 3), np.uint8)
    rgb[..., 0] = 200
    path = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(path)
    page.click('nav button[data-view="try"]')
    page.select_option("#try-model", MODEL_ID)
    page.set_input_files("#upload", str(path))
    message = page.locator("#message")
    message.wait_for(state="visible", timeout=60_000)
    text = message.inner_text()
    assert MODEL_ID in text and "'raw'" in text and "channel" in text and "3" in text, text
    screenshots(page, tmp_path, "try-error")
    out = run_upload(page, MODEL / "test_input.npy")  # still works
    np.testing.assert_allclose(out, Y, atol=1e-4, rtol=0)


def test_test_button_shows_passed(page, tmp_path):
    page.click('nav button[data-view="test"]')
    page.select_option("#test-model", MODEL_ID)
    page.keyboard.press("Tab")
    page.focus("#run-test")
    page.keyboard.press("Enter")  # usable by keyboard
    page.wait_for_selector("#test-result.passed", timeout=120_000)
    assert "passed" in page.inner_text("#test-result")
    assert "probability" in page.inner_text("#test-table")
    screenshots(page, tmp_path, "test")


def test_status_view_shows_both_replicas_and_a_killed_one_replaced(page, tmp_path, served):
    import os
    import signal
    import time

    from playwright.sync_api import expect  # the page's CSP forbids evaluating strings

    page.click('nav button[data-view="status"]')
    expect(page.locator("tr.replica")).to_have_count(2, timeout=60_000)
    rows = page.locator("tr.replica").all_inner_texts()
    assert all("ready" in r for r in rows), rows
    assert MODEL_ID in page.inner_text("#status-models")
    # totals and latency percentiles (earlier tests ran requests), and the request plot
    expect(page.locator("#latency")).to_contain_text("latency p50", timeout=30_000)
    expect(page.locator("#plot polyline").first).to_have_attribute(
        "points", re.compile(r"\S+ \S+"), timeout=30_000
    )
    screenshots(page, tmp_path, "status")
    before = {r.split()[0] for r in rows}
    pids = triton_pids(served[1])
    assert len(pids) == 2, pids
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 120
    seen = set()
    while True:  # the page (polling every 2 s) shows a new replica, and two ready again
        rows = page.locator("tr.replica").all_inner_texts()
        seen.update(" ".join(r.split()[:2]) for r in rows if r.strip())
        ids = {r.split()[0] for r in rows if r.strip()}
        ready = [r for r in rows if r.split()[1:2] == ["ready"]]
        if ids - before and len(ready) == 2:
            break
        assert time.monotonic() < deadline, f"no replacement shown: {rows}; seen {seen}"
        time.sleep(0.5)
    assert len(ids & before) == 1, (before, ids)


def test_bad_uploads_get_4xx_not_500(site):
    """The try route refuses garbage, pickles and oversize shapes with a JSON 4xx."""
    import json
    import urllib.error
    import urllib.request

    pickled = io.BytesIO()
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    bodies = [
        b"",
        b"not an image",
        b"\x93NUMPY\x01\x00garbage",
        pickled.getvalue(),
        b"\x89PNG\r\n\x1a\n" + b"\x00" * 50,
        b"II*\x00" + b"\x00" * 50,
    ]
    for body in bodies:
        req = urllib.request.Request(
            f"{site}/bioengine/models/{MODEL_ID}/try", data=body, method="POST"
        )
        try:
            urllib.request.urlopen(req, timeout=60)
            raise AssertionError(f"{body[:20]!r} was accepted")
        except urllib.error.HTTPError as exc:
            assert 400 <= exc.code < 500, (body[:20], exc.code)
            assert "error" in json.loads(exc.read())


@pytest.fixture(scope="module")
def volume_site(tmp_path_factory):
    """The real gateway app in front of a small in-process service with one 3D model
    (b,c,z,y,x; it doubles its input): the page's slice slider without a 3D zoo model."""
    import asyncio
    import threading

    from test_http_cors import ToyService

    from bioengine_core.contracts import BackendContext, ModelInfo
    from bioengine_core.gateway_http import HttpGatewaySettings
    from bioengine_core.gateway_http_app import HttpGateway

    axes = ["batch", "channel", "z", "y", "x"]

    class Volume(ToyService):
        info = ModelInfo(
            id="toy", name="toy volume", description="doubles a volume",
            inputs=[{"id": "x", "dtype": "float32", "shape": [-1, 1, -1, -1, -1], "axes": axes}],
            outputs=[{"id": "y", "dtype": "float32", "shape": [-1, 1, -1, -1, -1], "axes": axes}],
            weight_format="onnx",
        )  # fmt: skip

    tmp = tmp_path_factory.mktemp("volume")
    gw = HttpGateway(
        HttpGatewaySettings(port=0),
        BackendContext(deployment="v", state_dir=tmp, config_dir=tmp),
    )
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run():  # its own thread: Playwright's sync API owns this thread's event loop
        asyncio.set_event_loop(loop)
        loop.run_until_complete(gw.start(Volume()))
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert started.wait(20)
    yield gw.url
    asyncio.run_coroutine_threadsafe(gw.stop(), loop).result(20)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_3d_result_gets_a_slice_slider(browser, volume_site, tmp_path):
    import tifffile  # a dependency: never skipped

    stack = np.stack([np.full((16, 16), k, np.float32) for k in range(5)])  # z,y,x
    stack[:, :8, :8] += 10
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack)
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(volume_site + "/")
        page.wait_for_selector('li.card[data-model="toy"]')
        page.click('nav button[data-view="try"]')
        page.set_input_files("#upload", str(path))
        page.wait_for_selector("#download:not([disabled])", timeout=60_000)
        slider = page.locator("#slice")
        assert page.locator("#slice-label").is_visible()
        assert slider.get_attribute("max") == "4"
        slider.focus()
        page.keyboard.press("End")  # keyboard moves through the slices
        assert slider.input_value() == "4"
        np.testing.assert_array_equal(downloaded(page), 2 * stack[None, None])
        screenshots(page, tmp_path, "try-3d")
    finally:
        context.close()
    assert not errors, errors


def test_try_an_image_of_another_size_is_tiled(site):
    """The page's route leaves spatial sizes to the service, which tiles: a 512x640 image
    (the test input, widened) comes back the same size."""
    import urllib.request

    wide = np.concatenate([X[0, 0], X[0, 0, :, :128]], axis=1)
    buf = io.BytesIO()
    np.save(buf, wide)
    req = urllib.request.Request(
        f"{site}/bioengine/models/{MODEL_ID}/try", data=buf.getvalue(), method="POST"
    )
    with urllib.request.urlopen(req, timeout=300) as resp:
        out = np.load(io.BytesIO(resp.read()), allow_pickle=False)
    assert out.shape == (1, 1, 512, 640)
    assert np.isfinite(out).all()
