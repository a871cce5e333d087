"""Chaos: steady load on two local replicas while a replica's Triton is SIGKILLed every 30 s
for 3 minutes (`BIOENGINE_CHAOS_SECONDS` shortens it for a quick local run): zero failed
requests, and every killed replica is replaced."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import urllib.request

import numpy as np
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
from test_e2e_local import tc_infer, triton_pids

from bioengine_core.testing.pytest_plugin import require_service

UNET = ROOT / "models" / "unet2d_nuclei_broad"
X = np.load(UNET / "test_input.npy")
Y = np.load(UNET / "test_output.npy")
SECONDS = float(os.environ.get("BIOENGINE_CHAOS_SECONDS", "180"))


def test_sigkill_every_30_s_under_steady_load_fails_no_request(tmp_path):
    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    port = free_port()
    serve = Serve(local_config(tmp_path, port=port, name="chaos", replicas=2))
    url = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    failures: list[str] = []
    done = [0]

    def client() -> None:
        while not stop.is_set():
            try:
                np.testing.assert_allclose(tc_infer(url, X), Y, atol=1e-4, rtol=1e-4)
                done[0] += 1
            except Exception as exc:  # noqa: BLE001 - every failure counts
                failures.append(f"{time.strftime('%H:%M:%S')} {exc}")

    try:
        serve.wait_serving()
        wait_for(lambda: get_status(url)["ready_replicas"] >= 2, 120, "two ready replicas")
        threads = [threading.Thread(target=client) for _ in range(3)]
        for t in threads:
            t.start()
        killed: list[int] = []
        rng = random.Random(7)
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            time.sleep(min(30.0, max(0.0, end - time.monotonic())))
            pids = sorted(triton_pids(tmp_path / "state"))
            if time.monotonic() < end and pids:
                victim = rng.choice(pids)
                os.kill(victim, signal.SIGKILL)
                killed.append(victim)
        stop.set()
        for t in threads:
            t.join(120)
        assert failures == [], failures[:5]
        assert done[0] > 20 and len(killed) >= max(1, int(SECONDS // 30) - 1)
        wait_for(lambda: get_status(url)["ready_replicas"] >= 2, 120, "two ready replicas")
        assert not set(killed) & triton_pids(tmp_path / "state")
        assert serve.output.count("replacing it") >= len(killed) - 1, serve.output[-3000:]
    finally:
        stop.set()
        serve.stop()


pytestmark = pytest.mark.triton


def test_scaling_down_under_load_drains_the_replica_first(tmp_path):
    """A replica picked for removal takes no new requests and finishes its in-flight ones
    before it is stopped: scaling 2 -> 1 under load fails no request."""
    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    port = free_port()
    serve = Serve(local_config(tmp_path, port=port, name="drain", replicas=2))
    url = f"http://127.0.0.1:{port}"
    stop = threading.Event()
    failures: list[str] = []

    def client() -> None:
        while not stop.is_set():
            try:
                np.testing.assert_allclose(tc_infer(url, X), Y, atol=1e-4, rtol=1e-4)
            except Exception as exc:  # noqa: BLE001 - every failure counts
                failures.append(str(exc))

    try:
        serve.wait_serving()
        wait_for(lambda: get_status(url)["ready_replicas"] >= 2, 120, "two ready replicas")
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(3)
        request = urllib.request.Request(
            f"{url}/bioengine/scale", data=b'{"replicas": 1}', method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        urllib.request.urlopen(request, timeout=120).read()
        time.sleep(3)
        stop.set()
        for t in threads:
            t.join(120)
        assert failures == [], failures[:5]
        assert "drained; stopping it (scaled down)" in serve.output, serve.output[-3000:]
        assert len(get_status(url)["replicas"]) == 1
        assert len(triton_pids(tmp_path / "state")) == 1
    finally:
        stop.set()
        serve.stop()
