"""A real tritonserver loads models published by S3Storage: from `s3://` directly, or the mirror."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from core_helpers import free_port

from bioengine_core.errors import ExecutorError
from bioengine_core.modelpkg import load_package
from bioengine_core.repository import build_triton_model
from bioengine_core.testing.pytest_plugin import require_service
from bioengine_core.triton import TritonInstall, find_triton, is_ready, triton_args, wait_ready

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "models" / "tiny_affine"

pytestmark = [pytest.mark.s3, pytest.mark.triton]


@pytest.fixture(scope="module")
def install() -> TritonInstall:
    """The real tritonserver with its python backend."""
    try:
        found = find_triton()
    except ExecutorError:
        found = None
    require_service(
        found is not None and "python" in found.backends, "tritonserver (python backend)"
    )
    assert found is not None
    return found


class Triton:
    """One tritonserver process over `repository`, with the storage's environment merged in."""

    def __init__(self, install: TritonInstall, repository: str, env: dict[str, str], log: Path):
        self.http_port = free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        args = triton_args(
            install,
            repository,
            http_port=self.http_port,
            grpc_port=free_port(),
            metrics_port=free_port(),
        )
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                args,
                env={**os.environ, **install.env, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def post(self, path: str) -> tuple[int, str]:
        """POST to the server; (status, body)."""
        req = urllib.request.Request(f"{self.url}{path}", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def get_json(self, path: str) -> dict:
        """GET a JSON document from the server."""
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as resp:
            return json.loads(resp.read())

    def load(self, name: str) -> None:
        """Load (or reload) `name` from the repository; fail with the log on error."""
        status, body = self.post(f"/v2/repository/models/{name}/load")
        assert status == 200, f"load {name}: {status} {body}\n{self.log.read_text()[-3000:]}"

    def infer(self, name: str, x: np.ndarray) -> np.ndarray:
        """Run `x` through model `name` with tritonclient (binary tensors)."""
        import tritonclient.http as httpclient  # noqa: PLC0415

        client = httpclient.InferenceServerClient(f"127.0.0.1:{self.http_port}")
        try:
            inp = httpclient.InferInput("x", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            return client.infer(name, [inp]).as_numpy("y")
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture
def start_triton(install, tmp_path):
    """`start_triton(location)`: a ready tritonserver over a storage location; stopped after."""
    started: list[Triton] = []

    def start(location) -> Triton:
        server = Triton(install, location.uri, location.env, tmp_path / f"triton{len(started)}.log")
        started.append(server)
        if not wait_ready(server.url, timeout=120):
            server.stop()
            pytest.fail(f"tritonserver not ready:\n{server.log.read_text()[-3000:]}")
        return server

    yield start
    for server in started:
        server.stop()


def build(dest: Path, **kwargs) -> Path:
    """The Triton model directory of tiny_affine (y = 2x + 1), built into `dest`."""
    return build_triton_model(load_package(TINY), dest, **kwargs).path


def test_triton_serves_a_model_straight_from_s3(
    seaweed, make_storage, prefix, start_triton, tmp_path
):
    """Triton reads `s3://http://host:port/bucket/prefix` with the credentials location() gives."""
    storage = make_storage(seaweed, prefix)
    storage.put("tiny_affine", build(tmp_path / "build"))
    location = storage.location()
    assert location.uri == f"s3://{seaweed.endpoint}/bioengine-tests/{prefix}"
    assert location.local_path is None
    assert location.env["AWS_ACCESS_KEY_ID"] == seaweed.access_key

    triton = start_triton(location)
    triton.load("tiny_affine")
    status, body = triton.post("/v2/repository/index")
    assert status == 200 and "tiny_affine" in {m["name"] for m in json.loads(body)}, body
    x = np.arange(12, dtype=np.float32).reshape(1, 1, 3, 4)
    np.testing.assert_allclose(triton.infer("tiny_affine", x), 2 * x + 1, rtol=1e-6)

    # Republish a changed model: only what changed goes up, and a reload serves the new version.
    storage.put("tiny_affine", build(tmp_path / "build2", max_batch_size=2))
    assert storage.last_publish is not None
    assert "config.pbtxt" in storage.last_publish.uploaded
    assert "1/package/weights.onnx" in storage.last_publish.unchanged
    assert triton.get_json("/v2/models/tiny_affine/config")["max_batch_size"] == 8
    triton.load("tiny_affine")
    assert triton.get_json("/v2/models/tiny_affine/config")["max_batch_size"] == 2
    np.testing.assert_allclose(triton.infer("tiny_affine", x), 2 * x + 1, rtol=1e-6)


def test_triton_with_a_wrong_secret_never_becomes_ready(
    seaweed, make_storage, prefix, install, tmp_path
):
    """The credentials in location().env are what lets Triton in: a wrong secret keeps it unready."""
    storage = make_storage(seaweed, prefix)
    storage.put("tiny_affine", build(tmp_path / "build"))
    env = {**storage.location().env, "AWS_SECRET_ACCESS_KEY": "wrong-secret"}
    triton = Triton(install, storage.location().uri, env, tmp_path / "triton.log")
    try:
        deadline = time.monotonic() + 60
        while "credentials" not in triton.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert "Unable to create S3 filesystem client" in triton.log.read_text()
        assert not is_ready(triton.url)
    finally:
        triton.stop()


def test_triton_serves_the_local_mirror_in_sync_mode(
    seaweed, make_storage, prefix, start_triton, tmp_path
):
    """Mode sync: Triton needs no S3 access; it reads the mirror that location() names."""
    storage = make_storage(seaweed, prefix, mode="sync")
    storage.put("tiny_affine", build(tmp_path / "build"))
    location = storage.location()
    assert location.local_path is not None and location.uri == str(location.local_path)
    assert not any(k.startswith("AWS_SECRET") for k in location.env)
    triton = start_triton(location)
    triton.load("tiny_affine")
    x = np.full((2, 1, 5, 5), 3.0, dtype=np.float32)
    np.testing.assert_allclose(triton.infer("tiny_affine", x), 2 * x + 1, rtol=1e-6)


def test_replicas_reach_s3_under_another_name(
    seaweed, make_storage, prefix, start_triton, tmp_path
):
    """replica_endpoint_url: Triton gets the endpoint by host name, the engine by address."""
    host_endpoint = seaweed.endpoint.replace("127.0.0.1", "localhost")
    if host_endpoint == seaweed.endpoint:
        pytest.skip("the S3 endpoint is not given as 127.0.0.1")
    storage = make_storage(seaweed, prefix, replica_endpoint_url=host_endpoint)
    storage.put("tiny_affine", build(tmp_path / "build"))
    location = storage.location()
    assert location.uri.startswith(f"s3://{host_endpoint}/")
    triton = start_triton(location)
    triton.load("tiny_affine")
    x = np.ones((1, 1, 2, 2), dtype=np.float32)
    np.testing.assert_allclose(triton.infer("tiny_affine", x), 3 * x, rtol=1e-6)
