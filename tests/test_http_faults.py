"""The gateway under faults and floods, against `bioengine serve` with the real Triton.

A frozen replica (SIGSTOP) costs no request: what was in flight to it is resent to the other
replica within the stall bound. A caller with a 1 ms deadline gets 504s and takes no replica out
of routing. Eight 200 MB bodies at once and a gzip bomb keep the gateway's memory within its
body budget while ordinary requests go on being answered.
"""

from __future__ import annotations

import gzip
import http.client
import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
from core_helpers import (
    ROOT,
    Serve,
    free_port,
    get_status,
    local_config,
    triton_available,
    wait_for,
)

from bioengine_core.testing.pytest_plugin import require_service

MODEL = ROOT / "models" / "unet2d_nuclei_broad"
MODEL_ID = "unet2d_nuclei_broad"
X = np.load(MODEL / "test_input.npy")
Y = np.load(MODEL / "test_output.npy")
STALL = 2.0  # [engine] stall_timeout in the config below
PROBE = 1.0  # [engine] probe_timeout
BUDGET = 512 << 20
MAX_BODY = 256 << 20
MAX_CONNECTIONS = 40

pytestmark = pytest.mark.triton


def infer(port: int, x: np.ndarray = X, *, timeout_us: int | None = None) -> np.ndarray:
    import tritonclient.http as tc

    client = tc.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=120)
    inp = tc.InferInput("raw", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    try:
        return client.infer(MODEL_ID, [inp], timeout=timeout_us).as_numpy("probability")
    finally:
        client.close()


def tritons(state) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        argv = proc.info["cmdline"] or []
        if argv and argv[0].endswith("tritonserver") and str(state) in " ".join(argv):
            found.append(proc)
    return found


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    tmp = tmp_path_factory.mktemp("faults")
    port = free_port()
    cfg = local_config(
        tmp,
        port=port,
        replicas=2,
        name="e2e-faults",
        gateway=f"max_request_bytes = {MAX_BODY}\nbody_memory_budget = {BUDGET}\n"
        "budget_wait = 2\nbody_timeout = 30\nheader_timeout = 3\n"
        f"max_connections = {MAX_CONNECTIONS}\n",
    )
    cfg.write_text(
        cfg.read_text().replace(
            "health_interval = 0.5\n",
            f"health_interval = 0.5\nstall_timeout = {STALL}\nprobe_timeout = {PROBE}\n",
        )
    )
    serve = Serve(cfg)
    try:
        serve.wait_serving()
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: get_status(url)["ready_replicas"] == 2, 180, "two ready replicas")
        yield serve, port, tmp / "state"
    finally:
        for proc in tritons(tmp / "state"):
            try:
                proc.send_signal(signal.SIGCONT)
            except psutil.Error:
                pass
        serve.stop()


def test_tiny_caller_deadline_is_a_504_and_no_replica_failure(served):
    from tritonclient.utils import InferenceServerException

    serve, port, _ = served
    url = f"http://127.0.0.1:{port}"
    np.testing.assert_allclose(infer(port), Y, atol=1e-4, rtol=1e-4)
    before = {r["id"]: r for r in get_status(url)["replicas"]}
    answers: list[str] = []
    for _ in range(60):
        try:
            infer(port, timeout_us=1000)
            answers.append("200")
        except InferenceServerException as exc:
            answers.append(str(exc.status()))
            assert "timed out" in exc.message(), exc.message()
        status = get_status(url)
        assert status["ready_replicas"] == 2 and all(r["routed"] for r in status["replicas"])
    assert set(answers) == {"504"}, answers
    after = {r["id"]: r for r in get_status(url)["replicas"]}
    assert after.keys() == before.keys()
    assert "failed a request" not in serve.output
    np.testing.assert_allclose(infer(port), Y, atol=1e-4, rtol=1e-4)


def test_sigstop_of_a_replica_under_load_loses_no_request(served):
    serve, port, state = served
    url = f"http://127.0.0.1:{port}"
    procs = tritons(state)
    assert len(procs) == 2
    victim = procs[0]
    failures: list[str] = []
    latencies: list[float] = []
    done = 0
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal done
        started = time.monotonic()
        try:
            y = infer(port)
            np.testing.assert_allclose(y, Y, atol=1e-4, rtol=1e-4)
        except Exception as exc:  # noqa: BLE001 - every failure counts
            failures.append(f"{i}: {exc}")
        with lock:
            latencies.append(time.monotonic() - started)
            done += 1

    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(one, i) for i in range(80)]
            wait_for(lambda: done >= 10, 120, "first requests")
            victim.send_signal(signal.SIGSTOP)
            for f in futures:
                f.result()
    finally:
        try:
            victim.send_signal(signal.SIGCONT)
        except psutil.Error:
            pass
    assert failures == []
    # in flight to the frozen replica: resent within the stall bound (stall + probe + checks)
    bound = STALL + PROBE + 1.0 + 3.0  # + time of a normal request on 2 busy cores
    assert max(latencies) < bound, sorted(latencies)[-5:]
    assert "stopped answering" in serve.output
    wait_for(lambda: get_status(url)["ready_replicas"] == 2, 180, "two ready replicas again")
    np.testing.assert_allclose(infer(port), Y, atol=1e-4, rtol=1e-4)


def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def _post_body(port: int, size: int, chunk: bytes) -> int:
    """POST `size` bytes (declared) to the infer route; the status code (or 0 when cut off)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.putrequest("POST", f"/v2/models/{MODEL_ID}/infer")
        conn.putheader("Content-Length", str(size))
        conn.putheader("Inference-Header-Content-Length", "2")
        conn.endheaders()
        sent = 0
        try:
            while sent < size:
                piece = chunk[: size - sent]
                conn.send(piece)
                sent += len(piece)
        except OSError:
            pass  # the gateway may answer (and close) before the whole body arrived
        return conn.getresponse().status
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        conn.close()


def test_big_bodies_and_gzip_bomb_stay_within_the_budget(served):
    serve, port, _ = served
    pid = serve.proc.pid
    base = _rss(pid)
    peak = base
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss(pid))
            time.sleep(0.02)

    ok: list[bool] = []

    def ordinary() -> None:
        while not stop.is_set():
            try:
                np.testing.assert_allclose(infer(port), Y, atol=1e-4, rtol=1e-4)
                ok.append(True)
            except Exception:  # noqa: BLE001
                ok.append(False)

    chunk = b"\0" * (4 << 20)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    worker = threading.Thread(target=ordinary, daemon=True)
    worker.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda _: _post_body(port, 200 << 20, chunk), range(8)))
        # a body that inflates 1000x is refused unread
        bomb = gzip.compress(b"\0" * (200 << 20), compresslevel=9)
        assert len(bomb) * 900 < 200 << 20
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request(
            "POST",
            f"/v2/models/{MODEL_ID}/infer",
            body=bomb,
            headers={"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"},
        )
        resp = conn.getresponse()
        bomb_status, bomb_body = resp.status, json.loads(resp.read())
        conn.close()
        # one body larger than the per-request limit: 413 from its declared length
        too_big = _post_body(port, MAX_BODY + 1, chunk)
        time.sleep(1.0)
    finally:
        stop.set()
        worker.join(timeout=120)
        sampler.join(timeout=5)
    assert bomb_status == 415 and "compressed" in bomb_body["error"]
    assert too_big == 413
    # every big body got an answer: 400 (not a valid request) or 503 (budget full, retry)
    assert set(codes) <= {400, 503}, codes
    assert 400 in codes
    margin = 200 << 20  # interpreter, buffers, one chunk per connection, Python's allocator
    assert peak - base < BUDGET + margin, (base >> 20, peak >> 20)
    assert ok and all(ok), f"{ok.count(False)} of {len(ok)} ordinary requests failed"
    assert os.path.exists(f"/proc/{pid}")


def test_idle_and_trickling_connections_are_closed_and_counted(served):
    import socket

    _, port, _ = served
    # beyond max_connections: 503 and closed at once
    idle = [
        socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(MAX_CONNECTIONS)
    ]
    try:
        time.sleep(0.5)
        extra = socket.create_connection(("127.0.0.1", port), timeout=10)
        answer = extra.recv(4096)
        extra.close()
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After" in answer, answer[:200]
    finally:
        for sock in idle:
            sock.close()
    # headers trickled one byte at a time and never finished: closed after header_timeout (3 s)
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.settimeout(0.3)
    started = time.monotonic()
    sock.sendall(b"POST /v2/models/unet2d_nuclei_broad/infer HTTP/1.1\r\nHost: x\r\n")
    closed_after = None
    while time.monotonic() - started < 15:
        try:
            sock.sendall(b"X")
            if sock.recv(4096) == b"":
                closed_after = time.monotonic() - started
                break
        except TimeoutError:
            continue
        except OSError:
            closed_after = time.monotonic() - started
            break
    sock.close()
    assert closed_after is not None and closed_after < 3 + 3, closed_after
    # idle connections went away with the same timeout; ordinary requests still work
    np.testing.assert_allclose(infer(port), Y, atol=1e-4, rtol=1e-4)


def test_compressed_transfer_encoding_is_refused_unread(served):
    """`Transfer-Encoding: gzip, chunked` is a compressed body too: 415, never inflated."""
    import socket

    _, port, _ = served
    bomb = gzip.compress(b"\0" * (50 << 20))
    chunked = f"{len(bomb):x}\r\n".encode() + bomb + b"\r\n0\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            f"POST /v2/models/{MODEL_ID}/infer HTTP/1.1\r\nHost: x\r\n"
            "Transfer-Encoding: gzip, chunked\r\n\r\n".encode()
        )
        try:
            sock.sendall(chunked)
        except OSError:
            pass  # answered and closed before the whole body arrived
        answer = sock.recv(4096)
    assert answer.split(b"\r\n", 1)[0].split()[1] in (b"415", b"400"), answer[:200]
    np.testing.assert_allclose(infer(port), Y, atol=1e-4, rtol=1e-4)
