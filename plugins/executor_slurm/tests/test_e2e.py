"""End-to-end: `bioengine serve` with `[executor] kind = "slurm"` on a real single-node cluster.

What an HPC operator sees: two replica jobs in squeue that reproduce unet2d_nuclei_broad's test
output through the HTTP gateway; an outside `scancel` under load costs no request and a new job
replaces the cancelled one; with a 2-minute time limit successor jobs keep the service up;
`kill -9` of serve and a new serve adopt the running jobs; SIGTERM cancels our jobs only.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from core_helpers import ROOT, Serve, free_port, get_status

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.triton,
    pytest.mark.usefixtures("slurm_cluster"),
]

BIOENGINE = Path(sys.executable).parent / "bioengine"
MODEL = ROOT / "models" / "unet2d_nuclei_broad"
MODEL_ID = "unet2d_nuclei_broad"
X = np.load(MODEL / "test_input.npy")
Y = np.load(MODEL / "test_output.npy")


def slurm_config(
    tmp: Path,
    *,
    name: str,
    port: int,
    replicas: int,
    time_limit: str = "10",
    successor_lead: float = 60.0,
) -> Path:
    """A site config serving unet2d_nuclei_broad from Slurm jobs on this machine."""
    text = f"""
[engine]
name = "{name}"
state_dir = "{tmp / "state"}"
replicas = {replicas}
health_interval = 0.5
stop_grace = 5
ready_timeout = 240
successor_lead = {successor_lead}

[executor]
kind = "slurm"
cpus = 1
time_limit = "{time_limit}"
bind_address = "127.0.0.1"
poll_interval = 0.5

[storage]
kind = "local"

[gateways.http]
kind = "http"
host = "127.0.0.1"
port = {port}

[[models]]
source = "folder:{MODEL}"
weight_format = "onnx"
"""
    path = tmp / "site.toml"
    path.write_text(text)
    return path


def our_jobs(name: str) -> dict[str, str]:
    """Job id -> state of the jobs of deployment `name` that squeue lists as alive (found by
    the comment naming the deployment: job names hold only its first characters)."""
    out = subprocess.run(
        ["squeue", "-h", "-o", "%i|%T|%k"], capture_output=True, text=True, check=True
    ).stdout
    jobs = {}
    for line in out.splitlines():
        job_id, state, comment = line.split("|", 2)
        if f"bioengine.deployment={name}" in comment.removeprefix("bioengine:").split(","):
            jobs[job_id] = state
    return {j: s for j, s in jobs.items() if s in ("PENDING", "RUNNING", "CONFIGURING")}


def scancel_deployments(name: str) -> None:
    """Cancel whatever jobs of deployment `name` are left (cleanup)."""
    ids = list(our_jobs(name))
    if ids:
        subprocess.run(["scancel", *ids], capture_output=True)


def leftovers(state_dir: Path) -> list[str]:
    """Processes (tritonserver, python backend stubs) still running on this deployment's files."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        argv = " ".join(proc.info["cmdline"] or [])
        if str(state_dir) in argv and "pytest" not in argv.split()[0]:
            found.append(f"{proc.info['pid']}: {argv[:160]}")
    return found


def wait_for(predicate, timeout: float, what: str):
    """Poll `predicate` until it returns something true; fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def infer(url: str) -> np.ndarray:
    """unet2d_nuclei_broad's test input through the gateway with a stock tritonclient."""
    import tritonclient.http as tc

    client = tc.InferenceServerClient(url.split("://")[1], network_timeout=120)
    inp = tc.InferInput("raw", list(X.shape), "FP32")
    inp.set_data_from_numpy(X, binary_data=True)
    result = client.infer(MODEL_ID, [inp], outputs=[tc.InferRequestedOutput("probability")])
    return result.as_numpy("probability")


class Load:
    """Clients sending the test input in a loop; every failure is recorded."""

    def __init__(self, url: str, clients: int = 2, pause: float = 0.05):
        self.url, self.pause = url, pause
        self.failures: list[str] = []
        self.done = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(clients)
        self._futures = [self._pool.submit(self._run) for _ in range(clients)]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                np.testing.assert_allclose(infer(self.url), Y, atol=1e-4, rtol=1e-4)
            except Exception as exc:  # noqa: BLE001 - every failure counts
                self.failures.append(f"{time.strftime('%H:%M:%S')} {exc}")
            with self._lock:
                self.done += 1
            time.sleep(self.pause)

    def stop(self) -> None:
        """Stop the clients and wait for their last request."""
        self._stop.set()
        for future in self._futures:
            future.result()
        self._pool.shutdown()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One `bioengine serve` with two Slurm replicas; the last test replaces it (kill -9)."""
    tmp = tmp_path_factory.mktemp("e2e-slurm")
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    port = free_port()
    config = slurm_config(tmp, name=name, port=port, replicas=2)
    # What `bioengine slurm script` prints before serve starts: the first job's script.
    printed = subprocess.run(
        [str(BIOENGINE), "slurm", "script", "--config", str(config), "--model", MODEL_ID],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    holder = {"serve": Serve(config), "config": config, "name": name, "printed": printed}
    url = f"http://127.0.0.1:{port}"
    try:
        holder["serve"].wait_serving(timeout=300)
        wait_for(lambda: get_status(url)["ready_replicas"] == 2, 240, "two ready replicas")
        holder["url"] = url
        yield holder
    finally:
        holder["serve"].stop(signal.SIGTERM)
        print(holder["serve"].output)
        scancel_deployments(name)


def test_two_jobs_serve_the_model_test_output(served):
    """Two replica jobs run in Slurm and the gateway reproduces the model's test output."""
    jobs = our_jobs(served["name"])
    assert len(jobs) == 2 and set(jobs.values()) == {"RUNNING"}, jobs
    status = get_status(served["url"])
    assert status["executor"] == "slurm"
    assert {r["id"] for r in status["replicas"]} == set(jobs)
    assert all(r["expires_at"] for r in status["replicas"])
    np.testing.assert_allclose(infer(served["url"]), Y, atol=1e-4, rtol=1e-4)


def test_plain_squeue_tells_replicas_apart_and_slurm_script_is_what_was_submitted(served):
    """squeue's default 8-character NAME column shows SHORT.1 and SHORT.2; the script that
    `bioengine slurm script` printed is byte for byte the one Slurm holds for job SHORT.1."""
    jobs = our_jobs(served["name"])
    plain = subprocess.run(
        ["squeue", "-h", "-j", ",".join(jobs)], capture_output=True, text=True, check=True
    ).stdout
    short = served["name"][:5]
    names = sorted(line.split()[2] for line in plain.splitlines())
    assert names == [f"{short}.1", f"{short}.2"], plain
    first = subprocess.run(
        ["squeue", "-h", "-j", ",".join(jobs), "-o", "%i %j"], capture_output=True, text=True
    ).stdout
    job_id = next(line.split()[0] for line in first.splitlines() if line.endswith(".1"))
    submitted = subprocess.run(
        ["scontrol", "write", "batch_script", job_id, "-"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert submitted == served["printed"]


def test_outside_scancel_under_load_loses_no_request(served):
    """scancel of one job while clients send requests: no request fails, a new job takes over."""
    url, name = served["url"], served["name"]
    before = our_jobs(name)
    victim = sorted(before)[0]
    load = Load(url)
    try:
        wait_for(lambda: load.done >= 10, 120, "first requests")
        subprocess.run(["scancel", victim], check=True)

        def replaced():
            status = get_status(url)
            ids = {r["id"] for r in status["replicas"] if r["state"] == "ready"}
            return status["ready_replicas"] == 2 and victim not in ids and len(ids) == 2

        wait_for(replaced, 180, "a replacement job to become ready")
        done_at_replacement = load.done
        wait_for(lambda: load.done >= done_at_replacement + 5, 60, "requests on the new set")
    finally:
        load.stop()
    assert load.failures == [], load.failures[:5]
    after = our_jobs(name)
    assert victim not in after and len(after) == 2
    output = served["serve"].output
    assert f"replica {victim} failed" in output and "replacing it" in output
    assert "outside BioEngine" in output or "CANCELLED" in output


def test_kill9_then_serve_adopts_jobs_and_sigterm_cancels_only_ours(served, foreign_job):
    """kill -9 of serve leaves the jobs; a new serve adopts them; SIGTERM cancels only ours."""
    url, name = served["url"], served["name"]
    jobs = our_jobs(name)
    assert len(jobs) == 2
    foreign = foreign_job("another-users-job")
    served["serve"].stop(signal.SIGKILL)
    time.sleep(1)
    assert our_jobs(name) == jobs  # the jobs outlive a crashed engine
    served["serve"] = second = Serve(served["config"])
    second.wait_serving(timeout=300)
    assert second.output.count("adopted running replica") == 2, second.output
    assert "started replica" not in second.output  # no duplicates submitted
    assert our_jobs(name) == jobs
    wait_for(lambda: get_status(url)["ready_replicas"] == 2, 120, "adopted replicas ready")
    np.testing.assert_allclose(infer(url), Y, atol=1e-4, rtol=1e-4)
    assert second.stop(signal.SIGTERM) == 0
    assert our_jobs(name) == {}
    state_dir = served["config"].parent / "state"
    wait_for(lambda: not leftovers(state_dir), 30, "no Triton process left behind")
    state = subprocess.run(
        ["squeue", "-h", "-j", foreign, "-o", "%T"], capture_output=True, text=True
    ).stdout.strip()
    assert state in ("RUNNING", "PENDING"), f"foreign job {foreign} is {state!r}"


def test_two_minute_jobs_are_succeeded_without_gap(tmp_path):
    """With a 2-minute time limit, successor jobs take over twice and no request fails."""
    name = f"e2e-succ-{uuid.uuid4().hex[:6]}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # One replica: nothing else covers a gap. Successors start 90 s before the limit.
    config = slurm_config(
        tmp_path, name=name, port=port, replicas=1, time_limit="2", successor_lead=90
    )
    serve = Serve(config)
    seen: list[str] = []
    load = None
    try:
        serve.wait_serving(timeout=300)
        load = Load(url, clients=1, pause=0.2)

        def two_successions():
            for replica in get_status(url)["replicas"]:
                if replica["state"] == "ready" and replica["id"] not in seen:
                    seen.append(replica["id"])
            return len(seen) >= 3

        wait_for(two_successions, 240, "two successions (three jobs in turn)")
        load.stop()
        assert load.failures == [], load.failures[:5]
        assert load.done > 20
        assert "to succeed" in serve.output and "its successor is ready" in serve.output
        # No job reached its limit: each was replaced before Slurm ended it.
        assert "TIMEOUT" not in serve.output and "replacing it" not in serve.output
    finally:
        if load is not None and not load._stop.is_set():
            load.stop()
        serve.stop(signal.SIGTERM)
        print(serve.output)
        scancel_deployments(name)
    assert our_jobs(name) == {}
    wait_for(lambda: not leftovers(tmp_path / "state"), 30, "no Triton process left behind")
