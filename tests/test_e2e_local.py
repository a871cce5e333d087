"""End-to-end: `bioengine serve` with the local executor, the real Triton binary and a real model.

What a user sees: the CLI and a stock tritonclient reproduce the model's test output, a killed
replica costs no request, bad requests get clear 4xx answers, shutdown and restart leave no
orphans and no duplicates.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
from core_helpers import (
    ROOT,
    Serve,
    free_port,
    get_status,
    local_config,
    run_cli,
    triton_available,
    wait_for,
)

from bioengine_core.testing.pytest_plugin import require_service

MODEL = ROOT / "models" / "unet2d_nuclei_broad"
X = np.load(MODEL / "test_input.npy")
Y = np.load(MODEL / "test_output.npy")
MODEL_ID = "unet2d_nuclei_broad"


pytestmark = pytest.mark.triton


def triton_pids(state: Path) -> set[int]:
    """Tritonserver processes serving the repository under `state` (any executor that runs
    them on this host)."""
    pids = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        argv = proc.info["cmdline"] or []
        if argv and argv[0].endswith("tritonserver") and str(state) in " ".join(argv):
            pids.add(proc.info["pid"])
    return pids


def tc_client(url: str):
    import tritonclient.http as tc

    return tc.InferenceServerClient(url.split("://")[1], network_timeout=120)


def tc_infer(url: str, x: np.ndarray, *, client=None) -> np.ndarray:
    import tritonclient.http as tc

    client = client or tc_client(url)
    inp = tc.InferInput("raw", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    result = client.infer(MODEL_ID, [inp], outputs=[tc.InferRequestedOutput("probability")])
    return result.as_numpy("probability")


def post(url: str, body: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One `bioengine serve` with two replicas for the tests of this module."""
    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    tmp = tmp_path_factory.mktemp("e2e")
    port = free_port()
    cfg = local_config(tmp, port=port, replicas=2)
    serve = Serve(cfg)
    try:
        serve.wait_serving()
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: get_status(url)["ready_replicas"] == 2, 180, "two ready replicas")
        yield serve, url, tmp / "state"
    finally:
        serve.stop()
        print(serve.output)


def test_serve_prints_how_to_call_it(served):
    serve, url, _ = served
    assert f"bioengine infer --url {url} --model {MODEL_ID}" in serve.output


def test_cli_infer_reproduces_test_output_onnx(served, tmp_path):
    _, url, _ = served
    out = tmp_path / "y.npy"
    result = run_cli(
        "infer",
        "--url",
        url,
        "--model",
        MODEL_ID,
        "--input",
        str(MODEL / "test_input.npy"),
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(out), Y, atol=1e-4, rtol=1e-4)


def test_stock_tritonclient_gets_same_output(served):
    _, url, _ = served
    client = tc_client(url)
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL_ID)
    meta = client.get_model_metadata(MODEL_ID)
    assert [t["name"] for t in meta["inputs"]] == ["raw"]
    config = client.get_model_config(MODEL_ID)
    assert config["name"] == MODEL_ID
    np.testing.assert_allclose(tc_infer(url, X, client=client), Y, atol=1e-4, rtol=1e-4)


def test_two_replicas_are_two_triton_processes(served):
    _, url, state = served
    status = get_status(url)
    assert status["ready_replicas"] == 2
    assert len({r["url"] for r in status["replicas"]}) == 2
    assert len(triton_pids(state)) == 2


def test_bad_requests_get_4xx_naming_model_and_tensor(served):
    import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException

    _, url, _ = served
    client = tc_client(url)
    # unknown model
    with pytest.raises(InferenceServerException) as info:
        client.infer("no_such_model", [tc.InferInput("raw", [1, 1, 4, 4], "FP32")])
    assert "no_such_model" in info.value.message()
    status, body = post(f"{url}/v2/models/no_such_model/infer", b"{}")
    assert status == 404 and "unknown model 'no_such_model'" in body["error"]
    # wrong shape that tiling cannot fix (two channels for a one-channel model)
    bad = np.zeros((1, 2, 17, 3), np.float32)
    with pytest.raises(InferenceServerException) as info:
        tc_infer(url, bad, client=client)
    msg = info.value.message()
    assert MODEL_ID in msg and "raw" in msg and info.value.status() == "400"
    # wrong dtype
    with pytest.raises(InferenceServerException) as info:
        inp = tc.InferInput("raw", list(X.shape), "INT32")
        inp.set_data_from_numpy(X.astype(np.int32), binary_data=True)
        client.infer(MODEL_ID, [inp])
    msg = info.value.message()
    assert MODEL_ID in msg and "raw" in msg and "int32" in msg.lower()
    # unknown input name
    inp = tc.InferInput("rwa", list(X.shape), "FP32")
    inp.set_data_from_numpy(X, binary_data=True)
    with pytest.raises(InferenceServerException) as info:
        client.infer(MODEL_ID, [inp])
    assert "rwa" in info.value.message()
    # malformed body
    status, body = post(
        f"{url}/v2/models/{MODEL_ID}/infer", b"{not json", {"Content-Type": "application/json"}
    )
    assert status == 400 and MODEL_ID in body["error"] and "malformed" in body["error"]
    status, body = post(f"{url}/v2/models/{MODEL_ID}/infer", b'{"inputs": [{"name": "raw"}]}')
    assert status == 400 and MODEL_ID in body["error"]
    # still serving, and every rejected request is counted as an error for the model
    np.testing.assert_allclose(tc_infer(url, X, client=client), Y, atol=1e-4, rtol=1e-4)
    with urllib.request.urlopen(f"{url}/metrics") as resp:
        metrics = resp.read().decode()
    errors = [
        line
        for line in metrics.splitlines()
        if line.startswith(f'bioengine_requests_total{{model="{MODEL_ID}",status="error"}}')
    ]
    assert errors and float(errors[0].split()[-1]) >= 5, metrics


def test_health_and_metrics(served):
    _, url, _ = served
    with urllib.request.urlopen(f"{url}/health") as resp:
        health = json.loads(resp.read())
    assert health["status"] == "ok" and health["replicas_ready"] == 2
    with urllib.request.urlopen(f"{url}/metrics") as resp:
        text = resp.read().decode()
    assert "bioengine_requests_total" in text
    assert "bioengine_request_latency_seconds_bucket" in text
    assert "bioengine_replicas_ready 2.0" in text


def test_status_command_shows_replicas(served):
    _, url, _ = served
    result = run_cli("status", "--url", url)
    assert result.returncode == 0, result.stderr
    assert "2/2 replicas ready" in result.stdout and MODEL_ID in result.stdout
    assert result.stdout.count("ready") >= 3


def test_sigkill_of_a_replica_under_load_loses_no_request(served):
    _, url, state = served
    before = triton_pids(state)
    assert len(before) == 2
    victim = sorted(before)[0]
    x = X
    failures: list[str] = []
    done = 0
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal done
        try:
            y = tc_infer(url, x)
            np.testing.assert_allclose(y, Y, atol=1e-4, rtol=1e-4)
        except Exception as exc:  # noqa: BLE001 - every failure counts
            failures.append(f"{i}: {exc}")
        with lock:
            done += 1

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(one, i) for i in range(200)]
        wait_for(lambda: done >= 20, 120, "first requests")
        os.kill(victim, signal.SIGKILL)
        for f in futures:
            f.result()
    assert failures == []

    def replaced():
        pids = triton_pids(state)
        return pids if len(pids) == 2 and victim not in pids else None

    after = wait_for(replaced, 120, "a replacement replica process")
    assert victim not in after

    def group_gone():
        for proc in psutil.process_iter():
            try:
                if os.getpgid(proc.pid) == victim:
                    return False
            except OSError:
                pass
        return True

    wait_for(group_gone, 30, "the killed replica's python backend stubs to be cleaned up")
    wait_for(lambda: get_status(url)["ready_replicas"] == 2, 120, "replacement ready")
    serve, _, _ = served
    # the operator can follow it: the failure, the replacement, the replacement ready
    new = [rid for rid in (r["id"] for r in get_status(url)["replicas"])]
    assert any(f"replica {rid} is ready at http://" in serve.output for rid in new), serve.output
    assert "is failed" in serve.output or "replacing it" in serve.output


def test_torchscript_weights_reproduce_test_output(tmp_path):
    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    port = free_port()
    serve = Serve(local_config(tmp_path, port=port, name="e2e-ts", weight_format="torchscript"))
    try:
        serve.wait_serving()
        url = f"http://127.0.0.1:{port}"
        assert get_status(url)["models"][0]["weight_format"] == "torchscript"
        out = tmp_path / "y.npy"
        result = run_cli(
            "infer",
            "--url",
            url,
            "--model",
            MODEL_ID,
            "--input",
            str(MODEL / "test_input.npy"),
            "--output",
            str(out),
        )
        assert result.returncode == 0, result.stderr
        np.testing.assert_allclose(np.load(out), Y, atol=1e-4, rtol=1e-4)
    finally:
        assert serve.stop() == 0
    assert triton_pids(tmp_path / "state") == set()
    # each replica's end is a line the operator can follow
    assert "drained; stopping it (shutdown)" in serve.output, serve.output


def test_sigterm_leaves_nothing_and_restart_after_kill9_adopts(tmp_path):
    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    port = free_port()
    cfg = local_config(tmp_path, port=port, name="e2e-adopt", replicas=2)
    state = tmp_path / "state"
    first = Serve(cfg)
    second = None
    try:
        first.wait_serving()
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: get_status(url)["ready_replicas"] == 2, 180, "two ready replicas")
        survivors = triton_pids(state)
        ids = {r["id"] for r in get_status(url)["replicas"]}
        assert len(survivors) == 2
        first.stop(signal.SIGKILL)
        assert triton_pids(state) == survivors  # replicas outlive a crashed engine
        second = Serve(cfg)
        second.wait_serving()
        assert "adopted running replica" in second.output
        status = get_status(url)
        assert {r["id"] for r in status["replicas"]} == ids
        assert all(r["adopted"] for r in status["replicas"])
        assert triton_pids(state) == survivors  # no duplicates
        np.testing.assert_allclose(tc_infer(url, X), Y, atol=1e-4, rtol=1e-4)
        assert second.stop(signal.SIGTERM) == 0
        assert triton_pids(state) == set()
    finally:
        for s in (first, second):
            if s is not None:
                s.stop(signal.SIGTERM)
        for pid in triton_pids(state):
            os.kill(pid, signal.SIGKILL)


def test_cli_infer_says_exactly_what_failed(served, tmp_path):
    _, url, _ = served
    args = ["infer", "--url", url, "--model", MODEL_ID, "--output", str(tmp_path / "y.npy")]
    missing = run_cli(*args, "--input", str(tmp_path / "nope.npy"))
    assert missing.returncode == 1 and "nope.npy: no such file" in missing.stderr
    assert "cannot reach" not in missing.stderr
    x = str(MODEL / "test_input.npy")
    extra = run_cli(*args, "--input", x, "--input", x)
    assert extra.returncode == 1 and "has 1 input(s) (raw)" in extra.stderr, extra.stderr
    wrong = run_cli(*args, "--input", f"rwa={x}")
    assert wrong.returncode == 1 and "no tensor 'rwa'" in wrong.stderr
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((1, 2, 3, 3), np.float32))  # two channels: not fixable by tiling
    refused = run_cli(*args, "--input", str(bad))
    assert refused.returncode == 1 and "refused the request (400)" in refused.stderr
    assert MODEL_ID in refused.stderr and "raw" in refused.stderr
    unknown = run_cli("infer", "--url", url, "--model", "nope", "--input", x, "--output", "y")
    assert unknown.returncode == 1 and "unknown model 'nope'" in unknown.stderr
    down = run_cli(
        "infer", "--url", f"http://127.0.0.1:{free_port()}", "--model", MODEL_ID,
        "--input", x, "--output", "y",
    )  # fmt: skip
    assert down.returncode == 1 and "cannot reach" in down.stderr


def test_serve_with_an_unset_credential_variable_fails_before_starting(tmp_path):
    cfg = local_config(
        tmp_path,
        port=free_port(),
        gateway='[[gateways.http.tokens]]\nrole = "admin"\nenv = "BIOENGINE_TEST_UNSET_VAR"\n',
    )
    check = run_cli("config", "check", "--config", str(cfg))
    assert check.returncode == 2 and "BIOENGINE_TEST_UNSET_VAR is not set" in check.stderr
    assert "key 'tokens[0].env'" in check.stderr
    result = run_cli("serve", "--config", str(cfg), timeout=120)
    assert result.returncode == 2 and "BIOENGINE_TEST_UNSET_VAR is not set" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "state" / "local").exists()  # nothing was started


def test_status_fits_80_columns_and_has_wide(served):
    _, url, _ = served
    narrow = run_cli("status", "--url", url, env={"COLUMNS": "80"})
    assert narrow.returncode == 0, narrow.stderr
    assert max(len(line) for line in narrow.stdout.splitlines()) <= 80, narrow.stdout
    replicas = get_status(url)["replicas"]
    assert all(r["url"] in narrow.stdout for r in replicas)  # endpoints are never cut
    assert "in flight" not in narrow.stdout and ", up " in narrow.stdout
    wide = run_cli("status", "--url", url, "--wide")
    assert wide.returncode == 0 and "in flight" in wide.stdout and "host" in wide.stdout


def test_durations_read_as_an_operator_reads_them():
    from bioengine_core.cli_client import human_duration

    assert [human_duration(s) for s in (0, 45, 200, 7500, 3 * 86400 + 4 * 3600)] == [
        "0s",
        "45s",
        "3m 20s",
        "2h 05m",
        "3d 04h",
    ]
