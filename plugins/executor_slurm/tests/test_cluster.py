"""The SLURM executor against a real single-node slurmctld + slurmd (.ci/start-slurm.sh).

Each test uses its own deployment name, so its jobs never collide with other tests' (or other
people's) jobs; the `deployment` fixture cancels whatever is left at teardown.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from bioengine_executor_slurm import SlurmExecutor

from bioengine_core.contracts import ReplicaState, ReplicaStatus
from bioengine_core.errors import ExecutorError
from bioengine_core.triton import is_ready

pytestmark = [pytest.mark.slurm, pytest.mark.triton, pytest.mark.usefixtures("slurm_cluster")]


def wait_for(
    executor: SlurmExecutor,
    replica_id: str,
    states: set[ReplicaState],
    timeout: float = 90.0,
) -> ReplicaStatus:
    """Poll status() until the state is one of `states`; fail with the last status and logs."""
    deadline = time.monotonic() + timeout
    status = executor.status(replica_id)
    while status.state not in states and time.monotonic() < deadline:
        time.sleep(0.3)
        status = executor.status(replica_id)
    assert status.state in states, (
        f"{replica_id}: {status.state.value} ({status.message}); logs:\n"
        f"{executor.logs(replica_id, tail=20)}"
    )
    return status


def squeue_state(job_id: str) -> str:
    """The job's state as `squeue` prints it ('' when the controller does not know it)."""
    run = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True, text=True
    )
    return run.stdout.strip()


def test_two_replicas_ready_then_outside_scancel_is_failed_with_reason(make_executor, spec):
    """Two jobs become READY on distinct ports; an outside scancel turns one FAILED, with why."""
    executor = make_executor()
    a, b = executor.start(spec), executor.start(spec)
    assert a.state is ReplicaState.PENDING and a.replica_id != b.replica_id
    ready_a = wait_for(executor, a.replica_id, {ReplicaState.READY})
    ready_b = wait_for(executor, b.replica_id, {ReplicaState.READY})
    assert ready_a.url != ready_b.url and is_ready(ready_a.url) and is_ready(ready_b.url)
    # Named SHORT.slot: squeue's 8-character name column tells the two replicas apart.
    short = spec.deployment[:5]
    assert [ready_a.details["job_name"], ready_b.details["job_name"]] == [
        f"{short}.1",
        f"{short}.2",
    ]
    # The job's time limit (10 min) is reported so the engine can start a successor in time.
    assert ready_a.expires_at == pytest.approx(ready_a.started_at + 600, abs=2)
    assert ready_a.details["slurm_state"] == "RUNNING" and ready_a.details["node"]
    assert "ready: http://127.0.0.1:" in executor.logs(a.replica_id)

    subprocess.run(["scancel", a.replica_id], check=True)
    exit_file = Path(executor.paths.endpoints) / f"{a.replica_id}.exit.json"
    wait = time.monotonic() + 30
    while not exit_file.exists() and time.monotonic() < wait:
        time.sleep(0.3)
    ended = json.loads(exit_file.read_text())  # what the launcher says agrees with the job
    assert ended["exit_code"] == 0, ended
    assert ended["reason"].startswith("stopped by SIGTERM (job cancelled"), ended
    assert "-11" not in ended["reason"]
    failed = wait_for(executor, a.replica_id, {ReplicaState.FAILED}, timeout=30)
    assert "outside BioEngine" in failed.message, failed.message
    # Once the job has ended, Slurm's final state is in the message.
    deadline = time.monotonic() + 30
    while "CANCELLED" not in failed.message and time.monotonic() < deadline:
        time.sleep(0.5)
        failed = executor.status(a.replica_id)
    assert failed.state is ReplicaState.FAILED
    assert "Slurm job" in failed.message and "CANCELLED" in failed.message, failed.message
    assert executor.status(b.replica_id).state is ReplicaState.READY
    assert [s.replica_id for s in executor.list(spec.deployment)] == [b.replica_id]
    # The engine stops a failed replica before replacing it: that must be harmless.
    executor.stop(a.replica_id, grace=2)
    executor.stop(b.replica_id, grace=5)
    assert wait_for(executor, b.replica_id, {ReplicaState.STOPPED}, 30).state


def test_restarted_executor_adopts_jobs_without_duplicates(
    make_executor, spec, context, deployment_jobs
):
    """A second executor instance (text squeue) adopts the running job: same URL, no new job."""
    first = make_executor()
    job = first.start(spec)
    url = wait_for(first, job.replica_id, {ReplicaState.READY}).url
    del first  # the engine was killed; the job keeps running

    second = make_executor(squeue_format="text")
    adopted = second.list(spec.deployment)
    assert [s.replica_id for s in adopted] == [job.replica_id]
    assert adopted[0].state is ReplicaState.READY and adopted[0].url == url
    assert adopted[0].labels["bioengine.deployment"] == spec.deployment
    jobs = deployment_jobs(spec.deployment)
    assert list(jobs) == [job.replica_id], f"expected exactly one job of the deployment: {jobs}"
    second.stop(job.replica_id, grace=5)
    assert wait_for(second, job.replica_id, {ReplicaState.STOPPED}, 30).message.startswith(
        "stopped"
    )
    assert second.list(spec.deployment) == []


def test_stop_cancels_only_our_jobs(make_executor, spec, foreign_job):
    """Stopping every replica leaves a foreign job (same user, other name) running, and a job
    of another deployment whose name looks the same (same first 5 characters, same slot)."""
    foreign = foreign_job("someone-elses-analysis", "-c", "1")
    lookalike = foreign_job(
        f"{spec.deployment[:5]}.1", f"--comment=bioengine:bioengine.deployment={spec.deployment}x"
    )
    executor = make_executor()
    ours = executor.start(spec)
    ready = wait_for(executor, ours.replica_id, {ReplicaState.READY})
    assert ready.details["job_name"] == f"{spec.deployment[:5]}.1"  # per deployment slots
    assert [s.replica_id for s in executor.list(spec.deployment)] == [ours.replica_id]
    executor.stop(lookalike, grace=1)
    # Refuses to touch a job that is not ours, even when asked by id.
    executor.stop(foreign, grace=1)
    assert executor.status(foreign).state is ReplicaState.STOPPED  # "not ours" reads as gone
    for status in executor.list(spec.deployment):
        executor.stop(status.replica_id, grace=5)
    assert squeue_state(ours.replica_id) in ("CANCELLED", "COMPLETING", "")
    assert squeue_state(foreign) in ("RUNNING", "PENDING")
    assert squeue_state(lookalike) in ("RUNNING", "PENDING")
    assert executor.list(spec.deployment) == []


def test_job_requesting_more_cpus_than_any_node_reports_slurms_reason(make_executor, spec):
    """A request the node cannot satisfy yields Slurm's reason at once, not a silent wait."""
    executor = make_executor(cpus=64)
    try:
        status = executor.start(spec)
    except ExecutorError as exc:  # some Slurm configurations reject it at submission
        assert "sbatch rejected" in str(exc) and "set [executor] cpus <=" in str(exc)
        assert "\n" not in str(exc)
        return
    try:
        pending = wait_for(executor, status.replica_id, {ReplicaState.PENDING}, 10)
        deadline = time.monotonic() + 15
        while "reason: None" in pending.message and time.monotonic() < deadline:
            time.sleep(0.5)
            pending = executor.status(status.replica_id)
        assert "PartitionConfig" in pending.message or "BadConstraints" in pending.message
        assert "will not start" in pending.message
        # and which key to change, to what the node has (what config check says)
        assert pending.message.startswith("cpus = 64 but the largest node in partition"), (
            pending.message
        )
        assert "set [executor] cpus <=" in pending.message
        assert pending.unsatisfiable is True
        assert "pending" in executor.logs(status.replica_id)
    finally:
        executor.stop(status.replica_id, grace=2)
    assert executor.status(status.replica_id).state is ReplicaState.STOPPED


def test_a_submission_slurm_refuses_is_one_line_naming_the_key_and_the_node(make_executor, spec):
    """More memory than the node has: sbatch refuses; the error names `memory` and the node's
    RealMemory, in one line (what `serve` prints after `error:`)."""
    executor = make_executor(memory="64G")
    with pytest.raises(ExecutorError) as caught:
        executor.start(spec)
    message = str(caught.value)
    assert message.startswith(
        "sbatch rejected the replica job (Requested node configuration is not available): "
        "memory = '64G' but the largest node in partition 'debug' has 4000 MB: set "
        "[executor] memory to at most 4000M"
    ), message
    assert "\n" not in message and "Traceback" not in message


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"triton_binary": "/bin/false"}, "tritonserver exited with code 1 before it was ready"),
        (
            {"ready_timeout": 6, "triton_args": ["--model-repository=/nonexistent/bioengine"]},
            "tritonserver was not ready after 6 s",
        ),
    ],
    ids=["crash", "never-ready"],
)
def test_triton_that_does_not_come_up_fails_with_launcher_reason(
    make_executor, spec, overrides, reason
):
    """A job whose Triton exits or never gets ready is FAILED, saying what the launcher saw."""
    executor = make_executor(**overrides)
    status = executor.start(spec)
    failed = wait_for(executor, status.replica_id, {ReplicaState.FAILED}, 60)
    assert reason in failed.message, failed.message
    assert "Slurm job" in failed.message and "FAILED" in failed.message
    executor.stop(status.replica_id, grace=1)


def test_cli_script_submits_and_becomes_ready(tmp_path: Path, deployment, repo, make_executor):
    """What `bioengine slurm script` prints is a script sbatch runs to a ready replica."""
    config = tmp_path / "site.toml"
    config.write_text(
        f'[engine]\nname = "{deployment}"\nstate_dir = "{tmp_path}/state"\n'
        '[executor]\nkind = "slurm"\ncpus = 1\ntime_limit = "10"\n'
        'bind_address = "127.0.0.1"\n'
        f'[storage]\nkind = "local"\npath = "{repo}"\n'
    )
    bioengine = Path(sys.executable).parent / "bioengine"
    script = subprocess.run(
        [str(bioengine), "slurm", "script", "--config", str(config)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    job_id = subprocess.run(
        ["sbatch", "--parsable"], input=script, capture_output=True, text=True, check=True
    ).stdout.strip()
    # The executor of that deployment adopts it as its own replica.
    executor = make_executor()
    try:
        assert [s.replica_id for s in executor.list(deployment)] == [job_id]
        wait_for(executor, job_id, {ReplicaState.READY})
    finally:
        executor.stop(job_id, grace=5)


@pytest.mark.parametrize("squeue_format", ["json", "text"])
def test_unknown_ids_are_stopped_and_stop_is_a_noop(make_executor, squeue_format):
    """Ids Slurm never issued (numeric or not) read as STOPPED; stop() of them does nothing."""
    executor = make_executor(squeue_format=squeue_format)
    for replica_id in ("999999999", "bioengine-never-started"):
        assert executor.status(replica_id).state is ReplicaState.STOPPED
        executor.stop(replica_id, grace=1)
        assert executor.logs(replica_id).startswith("(no output file")


def _controller_pid() -> int | None:
    try:
        return int(Path("/run/slurmctld.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def test_controller_outage_keeps_ready_replica_ready(make_executor, spec):
    """With slurmctld down, a replica whose Triton answers stays READY; Slurm resumes after."""
    pid = _controller_pid()
    if pid is None or not Path(f"/proc/{pid}").exists():
        pytest.skip("needs the local test cluster of .ci/start-slurm.sh (slurmctld pid file)")
    executor = make_executor()
    job = executor.start(spec)
    url = wait_for(executor, job.replica_id, {ReplicaState.READY}).url
    impatient = make_executor(command_retries=0)
    subprocess.run(["kill", str(pid)], check=True)
    try:
        deadline = time.monotonic() + 20
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        during = impatient.status(job.replica_id)
        assert during.state is ReplicaState.READY and during.url == url
        assert "Slurm does not answer" in during.message, during.message
        assert during.labels["bioengine.deployment"] == spec.deployment
    finally:
        subprocess.run(["/usr/sbin/slurmctld"], check=True)  # recovers its saved state
        deadline = time.monotonic() + 30
        while subprocess.run(["squeue", "-h"], capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, "slurmctld did not come back"
            time.sleep(0.5)
    after = wait_for(executor, job.replica_id, {ReplicaState.READY}, 30)
    assert after.message == "Triton is ready" and after.details["slurm_state"] == "RUNNING"
    executor.stop(job.replica_id, grace=5)


def test_triton_ports_come_from_the_port_range(make_executor, spec):
    """Firewalled nodes: `port_range` confines HTTP, gRPC and metrics ports of the replica."""
    from core_helpers import free_port

    low = 20000 + free_port() % 30000
    executor = make_executor(port_range=f"{low}-{low + 20}")
    status = executor.start(spec)
    try:
        ready = wait_for(executor, status.replica_id, {ReplicaState.READY})
        port = int(ready.url.rsplit(":", 1)[1])
        assert low <= port <= low + 20, ready.url
        log = executor.logs(status.replica_id)
        grpc = int(log.split("(grpc ", 1)[1].split(",", 1)[0])
        metrics = int(log.split("metrics ", 1)[1].split(")", 1)[0])
        assert {port, grpc, metrics} <= set(range(low, low + 21)), log
    finally:
        executor.stop(status.replica_id, grace=5)


def test_a_bad_port_range_names_the_key():
    from bioengine_executor_slurm.settings import SlurmSettings
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="port range like '9100-9199'"):
        SlurmSettings(port_range="9100:9199")
