"""Admission control and waiting for a replica, against a real Triton: beyond a model's queue
bound callers get 429 with Retry-After (never a hang), the service recovers when the load
drops, and a request that finds no replica waits and then says why."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
from core_helpers import ROOT, Serve, free_port, get_status, local_config, triton_available

from bioengine_core.testing.pytest_plugin import require_service

UNET = ROOT / "models" / "unet2d_nuclei_broad"
X = np.load(UNET / "test_input.npy")
Y = np.load(UNET / "test_output.npy")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    tmp = tmp_path_factory.mktemp("admission")
    port = free_port()
    serve = Serve(
        local_config(tmp, port=port, name="admission"),
        env={"BIOENGINE_ENGINE__MAX_QUEUE_PER_MODEL": "2"},
    )
    try:
        serve.wait_serving()
        yield {"url": f"http://127.0.0.1:{port}", "serve": serve}
    finally:
        serve.stop()


def _post_infer(url: str, timeout_us: int | None = None) -> tuple[int, dict[str, str], bytes]:
    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    inp = httpclient.InferInput("raw", list(X.shape), "FP32")
    inp.set_data_from_numpy(X, binary_data=True)
    body, header_length = client.generate_request_body([inp], timeout=timeout_us)
    client.close()
    headers = {"Content-Type": "application/octet-stream"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    request = urllib.request.Request(
        f"{url}/v2/models/unet2d_nuclei_broad/infer", data=body, headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_a_burst_beyond_the_queue_bound_gets_429_with_retry_after(served):
    url = served["url"]
    results: list[tuple[int, dict[str, str], bytes]] = []
    threads = [threading.Thread(target=lambda: results.append(_post_infer(url))) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(results) == 12, "every caller got an answer (none hung)"
    codes = sorted(code for code, _, _ in results)
    assert set(codes) <= {200, 429}, codes
    assert codes.count(200) >= 2 and codes.count(429) >= 1, codes
    for code, headers, body in results:
        if code == 429:
            assert int(headers["Retry-After"]) >= 1
            assert b"max_queue_per_model = 2" in body and b"unet2d_nuclei_broad" in body
    assert _post_infer(url)[0] == 200  # recovered once the burst is over
    assert get_status(url)["ready_replicas"] == 1


def test_no_replica_waits_within_the_deadline_and_says_why(served):
    url = served["url"]
    request = urllib.request.Request(
        f"{url}/bioengine/scale", data=b'{"replicas": 0}', method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=60) as resp:
        assert resp.status == 200
    code, _, body = _post_infer(url, timeout_us=2_000_000)
    assert code == 504, body
    assert b"waiting for a replica" in body and b"target 0" in body
    assert get_status(url)["target_replicas"] == 0
