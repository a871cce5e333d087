"""The autoscaler on real Triton replicas (local executor): a deployment at zero replicas answers
its first request after a cold start, grows under load toward max_replicas, shrinks back when the
load stops and idles to zero; every decision is logged with its reason and shown in status;
a manual scale is bounded by the same limits."""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
from core_helpers import (
    ROOT,
    Serve,
    free_port,
    get_status,
    local_config,
    run_cli,
    triton_available,
)

from bioengine_core.testing.pytest_plugin import require_service

UNET = ROOT / "models" / "unet2d_nuclei_broad"
X = np.load(UNET / "test_input.npy")
Y = np.load(UNET / "test_output.npy")
AUTOSCALE = """
[autoscale]
enabled = true
min_replicas = 0
max_replicas = 2
target_inflight_per_replica = 1
load_window = 2
scale_up_delay = 1
scale_down_delay = 4
cooldown = 1
idle_to_zero_after = 8
cold_start_timeout = 120
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    tmp = tmp_path_factory.mktemp("autoscale")
    port = free_port()
    config = local_config(tmp, port=port, name="autoscale", replicas=0)
    config.write_text(config.read_text() + AUTOSCALE)
    serve = Serve(config)
    try:
        serve.wait_serving()
        yield {"url": f"http://127.0.0.1:{port}", "serve": serve}
    finally:
        serve.stop()
        (tmp / "serve.log").write_text(serve.output)


def _infer(url: str) -> np.ndarray:
    client = httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=180)
    try:
        inp = httpclient.InferInput("raw", list(X.shape), "FP32")
        inp.set_data_from_numpy(X, binary_data=True)
        return client.infer("unet2d_nuclei_broad", [inp]).as_numpy("probability")
    finally:
        client.close()


def _wait(predicate, timeout: float, what: str, served) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}:\n{served['serve'].output[-3000:]}"
        time.sleep(0.5)


def test_the_first_request_at_zero_replicas_waits_for_a_cold_start(served):
    url, serve = served["url"], served["serve"]
    assert get_status(url)["ready_replicas"] == 0
    np.testing.assert_allclose(_infer(url), Y, atol=1e-4, rtol=1e-4)
    assert "autoscale: 0 -> 1 replica: 1 request waiting" in serve.output
    decisions = get_status(url)["autoscale"]["decisions"]
    assert decisions[-1]["kind"] == "from_zero" and decisions[-1]["target"] == 1


def test_load_grows_replicas_and_its_end_shrinks_them_to_zero(served):
    url, serve = served["url"], served["serve"]
    stop = threading.Event()
    failures: list[Exception] = []

    def client() -> None:
        while not stop.is_set():
            try:
                np.testing.assert_allclose(_infer(url), Y, atol=1e-4, rtol=1e-4)
            except Exception as exc:  # noqa: BLE001 - asserted below
                failures.append(exc)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        _wait(lambda: get_status(url)["ready_replicas"] == 2, 120, "growing to 2", served)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert failures == []
    assert "autoscale: 1 -> 2 replicas:" in serve.output and "in flight per replica" in serve.output
    _wait(lambda: get_status(url)["target_replicas"] == 0, 90, "idling to zero", served)
    _wait(lambda: not get_status(url)["replicas"], 60, "replicas stopped", served)
    kinds = [d["kind"] for d in get_status(url)["autoscale"]["decisions"]]
    assert "up" in kinds and "to_zero" in kinds, kinds
    shown = json.loads(urllib.request.urlopen(f"{url}/bioengine/status", timeout=10).read())
    assert shown["autoscale"]["min_replicas"] == 0 and shown["autoscale"]["max_replicas"] == 2
    metrics = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    assert 'bioengine_autoscale_decisions_total{kind="up"}' in metrics
    table = run_cli("status", "--url", url)
    assert table.returncode == 0, table.stderr
    assert "autoscale: target 0 (min 0, max 2)" in table.stdout
    assert "-> 0 replicas:" in table.stdout, table.stdout


def test_a_manual_scale_is_bounded_by_max_replicas(served):
    url, serve = served["url"], served["serve"]
    request = urllib.request.Request(
        f"{url}/bioengine/scale", data=b'{"replicas": 5}', method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as resp:
        assert resp.status == 200
    assert "manual (5 is above max_replicas 2: using 2)" in serve.output
    assert get_status(url)["target_replicas"] == 2


def test_triton_queue_time_over_its_target_adds_a_replica(tmp_path):
    """With target_queue_seconds, the queue time Triton reports (/v2/models/stats) drives the
    scale-up even when the in-flight target is far away."""
    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    port = free_port()
    config = local_config(tmp_path, port=port, name="autoscale-queue", replicas=1)
    config.write_text(
        config.read_text() + "\n[autoscale]\nenabled = true\nmin_replicas = 1\nmax_replicas = 2\n"
        "target_inflight_per_replica = 100\ntarget_queue_seconds = 0.01\nload_window = 2\n"
        "scale_up_delay = 1\ncooldown = 1\n"
    )
    serve = Serve(config)
    url = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    try:
        serve.wait_serving()

        def client() -> None:
            while not stop.is_set():
                _infer(url)

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        _wait(
            lambda: get_status(url)["target_replicas"] == 2,
            90,
            "a second replica for the queue time",
            {"serve": serve},
        )
        assert "queue time" in serve.output and "> target 0.01 s" in serve.output
    finally:
        stop.set()
        serve.stop()
