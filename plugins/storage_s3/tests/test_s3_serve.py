"""End-to-end: `bioengine serve` with `[storage] kind = "s3"` on SeaweedFS and real Triton replicas."""

from __future__ import annotations

import psutil
import pytest
from core_helpers import ROOT, Serve, free_port, get_status

from bioengine_core.errors import ExecutorError
from bioengine_core.testing.pytest_plugin import require_service
from bioengine_core.triton import find_triton

pytestmark = [pytest.mark.s3, pytest.mark.triton]

MODEL = ROOT / "models" / "tiny_affine"


def triton_available() -> bool:
    """True when the real tritonserver can be found."""
    try:
        find_triton()
    except ExecutorError:
        return False
    return True


def s3_config(tmp_path, server, prefix: str, port: int, mode: str) -> object:
    """A site config: local process replicas, S3 storage on `server`, HTTP gateway on `port`."""
    path = tmp_path / "site.toml"
    path.write_text(
        f'[engine]\nname = "s3e2e"\nstate_dir = "{tmp_path / "state"}"\nreplicas = 1\n'
        "health_interval = 0.5\nstop_grace = 5\n\n"
        '[executor]\nkind = "local"\nmode = "process"\n\n'
        f'[storage]\nkind = "s3"\nmode = "{mode}"\nendpoint_url = "{server.endpoint}"\n'
        f'bucket = "{server.bucket}"\nprefix = "{prefix}"\ncreate_bucket = true\n'
        f'access_key_id = "{server.access_key}"\n\n'
        f'[gateways.http]\nkind = "http"\nport = {port}\n\n'
        f'[[models]]\nsource = "folder:{MODEL}"\n'
    )
    return path


def triton_cmdlines(state) -> list[str]:
    """Command lines of the tritonserver processes this deployment started."""
    found = []
    for proc in psutil.process_iter(["cmdline", "environ"]):
        argv = proc.info["cmdline"] or []
        if argv and argv[0].endswith("tritonserver"):
            found.append(" ".join(argv))
    return found


def objects(server, prefix: str) -> dict[str, tuple]:
    """Every object under `prefix`: key -> (ETag, LastModified), as any S3 client sees them."""
    client = server.client()
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=server.bucket, Prefix=prefix + "/"
        )
        return {
            o["Key"]: (o["ETag"], o["LastModified"]) for p in pages for o in p.get("Contents", [])
        }
    finally:
        client.close()


def infer(url: str):
    """tiny_affine through the HTTP gateway with a stock tritonclient; (x, y)."""
    import numpy as np
    import tritonclient.http as tc

    client = tc.InferenceServerClient(url.split("://")[1], network_timeout=60)
    try:
        x = np.linspace(-1, 1, 2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)
        inp = tc.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        return x, client.infer("tiny_affine", [inp]).as_numpy("y")
    finally:
        client.close()


@pytest.mark.parametrize("mode", ["s3", "sync"])
def test_serve_publishes_to_s3_and_serves_from_it(seaweed, tmp_path, prefix, mode):
    """serve publishes the model to the bucket, replicas load it, tritonclient gets 2x+1."""
    import numpy as np

    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    config = s3_config(tmp_path, seaweed, prefix, port, mode)
    # The secret comes from the environment override, as an operator would pass it.
    env = {"BIOENGINE_STORAGE__SECRET_ACCESS_KEY": seaweed.secret_key}
    serve = Serve(config, env=env)
    try:
        serve.wait_serving(timeout=180)
        x, y = infer(url)
        np.testing.assert_allclose(y, 2 * x + 1, rtol=1e-6)
        storage = get_status(url)["storage"]
        assert storage["kind"] == "s3"
        if mode == "s3":
            assert storage["uri"] == f"s3://{seaweed.endpoint}/{seaweed.bucket}/{prefix}"
            assert any(
                f"--model-repository=s3://{seaweed.endpoint}/{seaweed.bucket}/{prefix}" in cmd
                for cmd in triton_cmdlines(tmp_path / "state")
            )
        else:
            assert storage["uri"] == str(tmp_path / "state" / "s3-mirror")
            assert (tmp_path / "state" / "s3-mirror" / "tiny_affine" / "config.pbtxt").is_file()
        client = seaweed.client()
        listed = client.list_objects_v2(Bucket=seaweed.bucket, Prefix=f"{prefix}/tiny_affine/")
        client.close()
        assert f"{prefix}/tiny_affine/config.pbtxt" in {o["Key"] for o in listed["Contents"]}
    finally:
        code = serve.stop()
        if mode != "s3":
            seaweed.empty(prefix)
    assert code == 0, serve.output
    assert seaweed.secret_key not in serve.output
    if mode != "s3":
        return

    # A restart with the same model writes nothing: every object (tree, blobs, the manifest)
    # keeps its ETag and time, so `sync` mirrors have nothing to fetch.
    before = objects(seaweed, prefix)
    again = Serve(config, env=env)
    try:
        again.wait_serving(timeout=180)
        after = objects(seaweed, prefix)
        assert f"{prefix}/.bioengine/models/tiny_affine.json" in before
        assert after == before
        assert "unchanged" in again.output and "nothing written" in again.output
        x, y = infer(url)
        np.testing.assert_allclose(y, 2 * x + 1, rtol=1e-6)
    finally:
        code = again.stop()
        seaweed.empty(prefix)
    assert code == 0, again.output
