"""Elastic replicas on the real Slurm cluster: a deployment at zero replicas answers its first
request after a job starts, and while the job is queued (here: a begin time) `status` shows
Slurm's pending reason; under steady load an outside `scancel` of one of our
jobs every 30 s for 3 minutes (`BIOENGINE_CHAOS_SECONDS`) fails no request."""

from __future__ import annotations

import os
import random
import subprocess
import threading
import time
import urllib.request
import uuid

import pytest
from core_helpers import Serve, free_port, get_status
from test_e2e import Load, infer, our_jobs, scancel_deployments, slurm_config, wait_for

pytestmark = [pytest.mark.slurm, pytest.mark.triton, pytest.mark.usefixtures("slurm_cluster")]
SECONDS = float(os.environ.get("BIOENGINE_CHAOS_SECONDS", "180"))
AUTOSCALE = """
[autoscale]
enabled = true
min_replicas = 0
max_replicas = 1
idle_to_zero_after = 600
cold_start_timeout = 240
"""


def test_from_zero_the_request_waits_for_a_queued_job_and_its_reason_is_shown(tmp_path):
    name = f"el-{uuid.uuid4().hex[:6]}"
    port = free_port()
    config = slurm_config(tmp_path, name=name, port=port, replicas=0)
    text = config.read_text().replace("[engine]\n", "[engine]\nrequest_timeout = 200\n", 1)
    # the job may not start for 25 s (Slurm's BeginTime): a queued job, on any cluster
    text = text.replace(
        "poll_interval = 0.5\n", 'poll_interval = 0.5\nextra_sbatch = ["--begin=now+25"]\n'
    )
    config.write_text(text + AUTOSCALE)
    serve = Serve(config)
    url = f"http://127.0.0.1:{port}"
    result: list = []
    try:
        serve.wait_serving()
        caller = threading.Thread(target=lambda: result.append(infer(url)))
        caller.start()

        def pending_with_reason():
            rows = get_status(url)["replicas"]
            return [
                r for r in rows if r["state"] == "pending" and "reason: BeginTime" in r["message"]
            ]

        wait_for(pending_with_reason, 20, "our job pending with Slurm's reason (BeginTime)")
        assert "autoscale: 0 -> 1 replica: 1 request waiting" in serve.output
        caller.join(240)
        assert len(result) == 1 and result[0].shape == (1, 1, 512, 512)
    finally:
        serve.stop()
        scancel_deployments(name)


def test_scancel_every_30_s_under_steady_load_fails_no_request(tmp_path):
    name = f"ch-{uuid.uuid4().hex[:6]}"
    port = free_port()
    serve = Serve(slurm_config(tmp_path, name=name, port=port, replicas=2))
    url = f"http://127.0.0.1:{port}"
    load = None
    try:
        serve.wait_serving()
        wait_for(lambda: get_status(url)["ready_replicas"] == 2, 240, "two ready jobs")
        load = Load(url)
        rng = random.Random(11)
        cancelled: list[str] = []
        end = time.monotonic() + SECONDS
        while time.monotonic() < end:
            time.sleep(min(30.0, max(0.0, end - time.monotonic())))
            running = sorted(j for j, s in our_jobs(name).items() if s == "RUNNING")
            if time.monotonic() < end and running:
                victim = rng.choice(running)
                subprocess.run(["scancel", victim], check=True)
                cancelled.append(victim)
        load.stop()
        assert load.failures == [], load.failures[:5]
        assert load.done > 20 and len(cancelled) >= max(1, int(SECONDS // 30) - 1)
        wait_for(lambda: get_status(url)["ready_replicas"] == 2, 240, "two ready jobs again")
        assert not set(cancelled) & set(our_jobs(name))
        assert "cancelled outside BioEngine" in serve.output
    finally:
        if load is not None and not load._stop.is_set():
            load.stop()
        serve.stop()
        scancel_deployments(name)


def test_a_scaled_down_job_is_cancelled_only_after_it_drained(tmp_path):
    """Scaling 2 -> 1 under load: the job leaves the routing, finishes its requests, and only
    then is cancelled; no request fails."""
    name = f"dr-{uuid.uuid4().hex[:6]}"
    port = free_port()
    serve = Serve(slurm_config(tmp_path, name=name, port=port, replicas=2))
    url = f"http://127.0.0.1:{port}"
    load = None
    try:
        serve.wait_serving()
        wait_for(lambda: get_status(url)["ready_replicas"] == 2, 240, "two ready jobs")
        load = Load(url, clients=3)
        wait_for(lambda: load.done >= 5, 120, "first requests")
        request = urllib.request.Request(
            f"{url}/bioengine/scale", data=b'{"replicas": 1}', method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        urllib.request.urlopen(request, timeout=120).read()
        wait_for(lambda: len(our_jobs(name)) == 1, 120, "one job left")
        done = load.done
        wait_for(lambda: load.done >= done + 5, 60, "requests on the remaining job")
        load.stop()
        assert load.failures == [], load.failures[:5]
        lines = serve.output.splitlines()
        drained = next(i for i, line in enumerate(lines) if "stopping it (scaled down)" in line)
        assert "drained;" in lines[drained], lines[drained]
    finally:
        if load is not None and not load._stop.is_set():
            load.stop()
        serve.stop()
        scancel_deployments(name)


def test_load_grows_jobs_to_max_and_its_end_shrinks_them(tmp_path):
    """The autoscaler on Slurm: under load a second job is submitted, after the load the extra
    job drains and is cancelled; each decision is in the log and in status."""
    name = f"as-{uuid.uuid4().hex[:6]}"
    port = free_port()
    config = slurm_config(tmp_path, name=name, port=port, replicas=1)
    config.write_text(
        config.read_text() + "\n[autoscale]\nenabled = true\nmin_replicas = 1\nmax_replicas = 2\n"
        "target_inflight_per_replica = 1\nload_window = 2\nscale_up_delay = 1\n"
        "scale_down_delay = 4\ncooldown = 1\n"
    )
    serve = Serve(config)
    url = f"http://127.0.0.1:{port}"
    load = None
    try:
        serve.wait_serving()
        load = Load(url, clients=4, pause=0)
        wait_for(lambda: get_status(url)["ready_replicas"] == 2, 240, "a second ready job")
        assert len(our_jobs(name)) == 2
        load.stop()
        assert load.failures == [], load.failures[:5]
        wait_for(lambda: len(our_jobs(name)) == 1, 120, "back to one job")
        kinds = [d["kind"] for d in get_status(url)["autoscale"]["decisions"]]
        assert kinds[:2] == ["up", "down"], kinds
        assert "autoscale: 1 -> 2 replicas:" in serve.output
        assert "autoscale: 2 -> 1 replica:" in serve.output
    finally:
        if load is not None and not load._stop.is_set():
            load.stop()
        serve.stop()
        scancel_deployments(name)
