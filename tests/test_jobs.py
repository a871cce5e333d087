"""Jobs (`/bioengine/jobs`) against a real Triton: a 2048x2048 image submitted as a job reports
progress as blocks done / total while it runs and its answer equals the synchronous one; a job
can be cancelled; unknown, malformed or unfinished jobs are clear 4xx answers."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.http as httpclient
from core_helpers import ROOT, Serve, free_port, local_config, triton_available

from bioengine_core.testing.pytest_plugin import require_service

UNET = ROOT / "models" / "unet2d_nuclei_broad"
BIG = np.tile(np.load(UNET / "test_input.npy"), (1, 1, 4, 4))


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    tmp = tmp_path_factory.mktemp("jobs")
    port = free_port()
    serve = Serve(local_config(tmp, port=port, name="jobs"))
    try:
        serve.wait_serving()
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.stop()


def _body(x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    inp = httpclient.InferInput("raw", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    out = httpclient.InferRequestedOutput("probability", binary_data=True)
    body, length = httpclient.InferenceServerClient.generate_request_body([inp], outputs=[out])
    return body, {"Inference-Header-Content-Length": str(length)}


def _call(method: str, url: str, body: bytes | None = None, headers=None):
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=300) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_a_large_image_as_a_job_reports_progress_and_its_answer(url):
    body, headers = _body(BIG)
    status, got, data = _call(
        "POST", f"{url}/bioengine/jobs?model=unet2d_nuclei_broad", body, headers
    )
    assert status == 202, data
    job = json.loads(data)
    assert got["Location"] == f"/bioengine/jobs/{job['id']}"
    seen = []
    deadline = time.monotonic() + 300
    while True:
        info = json.loads(_call("GET", f"{url}/bioengine/jobs/{job['id']}")[2])
        seen.append((info["state"], info["progress"]["done"], info["progress"]["total"]))
        if info["state"] in ("done", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, seen
        time.sleep(0.2)
    assert info["state"] == "done", info
    assert any(s == "running" and 0 < d < t for s, d, t in seen), seen  # progress while running
    assert info["progress"]["done"] == info["progress"]["total"] == 25
    status, got, data = _call("GET", f"{url}/bioengine/jobs/{job['id']}/result")
    assert status == 200
    result = httpclient.InferenceServerClient.parse_response_body(
        data, header_length=int(got["Inference-Header-Content-Length"])
    )
    client = httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=300)
    inp = httpclient.InferInput("raw", list(BIG.shape), "FP32")
    inp.set_data_from_numpy(BIG, binary_data=True)
    direct = client.infer("unet2d_nuclei_broad", [inp]).as_numpy("probability")
    client.close()
    np.testing.assert_allclose(result.as_numpy("probability"), direct, atol=1e-6)


def test_a_job_can_be_cancelled_and_has_no_result(url):
    body, headers = _body(BIG)
    job = json.loads(
        _call("POST", f"{url}/bioengine/jobs?model=unet2d_nuclei_broad", body, headers)[2]
    )
    status, _, data = _call("GET", f"{url}/bioengine/jobs/{job['id']}/result")
    assert status == 409 and b"has no result" in data
    assert _call("DELETE", f"{url}/bioengine/jobs/{job['id']}")[0] == 200
    deadline = time.monotonic() + 120
    while json.loads(_call("GET", f"{url}/bioengine/jobs/{job['id']}")[2])["state"] != "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert _call("GET", f"{url}/bioengine/jobs/{job['id']}/result")[0] == 409


def test_unknown_malformed_and_unnamed_jobs_are_clear_4xx(url):
    assert _call("GET", f"{url}/bioengine/jobs/{'A' * 22}")[0] == 404
    status, _, data = _call("GET", f"{url}/bioengine/jobs/..%2F..%2Fetc")
    assert status == 404, data
    assert _call("POST", f"{url}/bioengine/jobs", b"{}")[0] == 400
    status, _, data = _call("POST", f"{url}/bioengine/jobs?model=nope", b"{}")
    assert status == 404 and b"unknown model 'nope'" in data
    status, _, data = _call("POST", f"{url}/bioengine/jobs?model=unet2d_nuclei_broad", b"{bad")
    job = json.loads(data)
    assert status == 202  # the body is parsed by the job: it fails with the parser's words
    deadline = time.monotonic() + 30
    while (info := json.loads(_call("GET", f"{url}/bioengine/jobs/{job['id']}")[2]))["state"] in (
        "queued",
        "running",
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert info["state"] == "failed" and "unet2d_nuclei_broad" in info["error"]


def test_an_oversized_job_body_is_refused_before_it_is_read(url):
    """The job route reads its body with the gateway's limits: a declared size beyond
    max_request_bytes is a 413 at once, and nothing is queued."""
    import socket

    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /bioengine/jobs?model=unet2d_nuclei_broad HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Length: 99999999999\r\n\r\n"
        )
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
