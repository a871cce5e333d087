"""Images of any size (#11): unet2d_nuclei_broad accepts exactly 1x1x512x512, yet 700x900,
300x300 and 2048x2048 inputs sent with a stock tritonclient come back at their own size and equal
bioimageio.core's own blocked prediction of the same image (whole-image statistics, halo,
stitching); inputs that tiling cannot fix (channels, axes) are still clear 400s."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
import tritonclient.http as httpclient
from core_helpers import (
    ROOT,
    Serve,
    free_port,
    get_status,
    local_config,
    triton_available,
    wait_for,
)
from test_e2e_local import triton_pids
from tritonclient.utils import InferenceServerException

from bioengine_core.testing.pytest_plugin import require_service

UNET = ROOT / "models" / "unet2d_nuclei_broad"
MODEL = "unet2d_nuclei_broad"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    tmp = tmp_path_factory.mktemp("tiling")
    port = free_port()
    serve = Serve(local_config(tmp, port=port, name="tiling", replicas=2))
    try:
        serve.wait_serving()
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: get_status(url)["ready_replicas"] == 2, 120, "two ready replicas")
        yield f"127.0.0.1:{port}", tmp / "state"
    finally:
        serve.stop()


@pytest.fixture(scope="module")
def reference():
    """bioimageio.core's blocked prediction in this process (onnxruntime), as a user runs it."""
    from bioimageio.core import Sample, Tensor, create_prediction_pipeline
    from bioimageio.spec import load_description

    descr = load_description(UNET / "bioimageio.yaml", perform_io_checks=False)
    pipeline = create_prediction_pipeline(descr, weight_format="onnx")

    def predict(x: np.ndarray) -> np.ndarray:
        # core refuses an image smaller than its block: a consumer pads it (reflect) and crops
        h, w = x.shape[2:]
        ph, pw = max(0, 512 - h), max(0, 512 - w)
        padded = np.pad(
            x, [(0, 0), (0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)], "reflect"
        )
        sample = Sample(
            members={"raw": Tensor.from_numpy(padded, dims=("batch", "channel", "y", "x"))},
            stat={},
            id=None,
        )
        out = pipeline.predict_sample_with_blocking(sample)
        y = out.members["probability"].data.transpose("batch", "channel", "y", "x").values
        return y[:, :, ph // 2 : ph // 2 + h, pw // 2 : pw // 2 + w]

    return predict


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A nuclei-like test image: the package's test input tiled and cropped, plus noise."""
    base = np.load(UNET / "test_input.npy")[0, 0]
    reps = (-(-h // base.shape[0]), -(-w // base.shape[1]))
    img = np.tile(base, reps)[:h, :w]
    noise = np.random.default_rng(seed).normal(0, 0.01 * img.std(), img.shape)
    return (img + noise).astype(np.float32)[None, None]


def _infer(url: str, x: np.ndarray) -> np.ndarray:
    client = httpclient.InferenceServerClient(url, network_timeout=600)
    try:
        inp = httpclient.InferInput("raw", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        return client.infer(MODEL, [inp]).as_numpy("probability")
    finally:
        client.close()


@pytest.mark.parametrize("size", [(700, 900), (300, 300), (2048, 2048)])
def test_any_size_equals_bioimageio_core_blocked_prediction(served, reference, size):
    x = _image(*size)
    got = _infer(served[0], x)
    assert got.shape == (1, 1, *size)
    np.testing.assert_allclose(got, reference(x), atol=1e-4, rtol=1e-4)


def test_the_exact_size_still_runs_whole_and_matches_the_test_output(served):
    x = np.load(UNET / "test_input.npy")
    np.testing.assert_allclose(_infer(served[0], x), np.load(UNET / "test_output.npy"), atol=1e-4)


def test_what_tiling_cannot_fix_is_a_clear_400_and_the_server_keeps_serving(served):
    served = served[0]
    for bad in (np.zeros((1, 3, 600, 600), np.float32), np.zeros((600, 600), np.float32)):
        with pytest.raises(InferenceServerException) as info:
            _infer(served, bad)
        assert "400" in str(info.value) and MODEL in str(info.value) and "'raw'" in str(info.value)
    assert get_status(f"http://{served}")["ready_replicas"] == 2
    assert _infer(served, _image(600, 600)).shape == (1, 1, 600, 600)


def test_a_replica_killed_during_a_tiled_request_costs_nothing(served, reference):
    """Blocks in flight on a replica that dies are resent to the other one."""
    url, state = served
    x = _image(2048, 2048, seed=3)
    result: list = []
    caller = threading.Thread(target=lambda: result.append(_infer(url, x)))
    caller.start()
    time.sleep(2.0)
    assert not result, "the request must still run when the replica dies (else nothing is shown)"
    victim = sorted(triton_pids(state))[0]
    os.kill(victim, signal.SIGKILL)
    caller.join(600)
    assert len(result) == 1
    np.testing.assert_allclose(result[0], reference(x), atol=1e-4, rtol=1e-4)
