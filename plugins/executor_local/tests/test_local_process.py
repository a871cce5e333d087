"""Process mode against the real tritonserver: conformance, failures, SIGKILL, adoption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import tritonclient.http as httpclient
from bioengine_executor_local import LocalExecutorSettings, ProcessExecutor
from bioengine_executor_local.plugin import make_executor
from pydantic import ValidationError

from bioengine_core.contracts import ReplicaState
from bioengine_core.plugins import PluginManager
from bioengine_core.testing.executor import ExecutorConformance
from bioengine_core.triton import is_ready


class TestProcessConformance(ExecutorConformance):
    """The conformance suite against real tritonserver processes."""

    ready_timeout = 90.0

    @pytest.fixture
    def executor(self, triton, context):
        ex = ProcessExecutor(LocalExecutorSettings(stop_grace=5), context)
        yield ex
        for meta in ex._all_meta():  # nothing may survive a test
            ex.stop(meta["replica_id"], grace=1)

    @pytest.fixture
    def restarted_executor(self, context):
        return ProcessExecutor(LocalExecutorSettings(stop_grace=5), context)


def fake_triton(tmp_path: Path, body: str) -> str:
    """A stand-in `tritonserver` script (to make a replica crash or ignore SIGTERM)."""
    path = tmp_path / "fake-tritonserver"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def wait_for(predicate, timeout: float = 20.0):
    """Poll `predicate` until it returns a truthy value or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    return predicate()


def wait_ready(ex: ProcessExecutor, replica_id: str, timeout: float = 90.0):
    """The replica's status once READY (asserted, with its log otherwise)."""
    status = wait_for(
        lambda: (s := ex.status(replica_id)).state is ReplicaState.READY and s, timeout=timeout
    )
    assert status, ex.logs(replica_id)
    return status


def test_crashed_replica_is_failed_with_exit_code_and_log_tail(tmp_path, context, replica_spec):
    """A server that exits on its own is FAILED, with its exit code and last log lines."""
    binary = fake_triton(tmp_path, 'echo "cannot open the model repository: boom" >&2\nexit 3\n')
    ex = ProcessExecutor(LocalExecutorSettings(triton_binary=binary), context)
    replica = ex.start(replica_spec)
    status = wait_for(
        lambda: (s := ex.status(replica.replica_id)).state is ReplicaState.FAILED and s
    )
    assert status, ex.status(replica.replica_id)
    assert "exit" in status.message and "code 3" in status.message
    assert "boom" in status.message
    assert replica.replica_id not in {s.replica_id for s in ex.list(replica_spec.deployment)}
    assert "boom" in ex.logs(replica.replica_id)
    ex.stop(replica.replica_id)
    assert ex.status(replica.replica_id).state is ReplicaState.STOPPED


def test_stop_escalates_to_sigkill_after_grace(tmp_path, context, replica_spec):
    """A server that ignores SIGTERM is killed once the grace period is over."""
    binary = fake_triton(tmp_path, "trap '' TERM\nwhile true; do sleep 0.1; done\n")
    ex = ProcessExecutor(LocalExecutorSettings(triton_binary=binary), context)
    replica = ex.start(replica_spec)
    pid = replica.details["pid"]
    time.sleep(0.3)
    t0 = time.monotonic()
    ex.stop(replica.replica_id, grace=1.0)
    elapsed = time.monotonic() - t0
    assert elapsed >= 0.9, elapsed  # SIGKILL only after the grace period
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert ex.status(replica.replica_id).state is ReplicaState.STOPPED


def test_replica_environment_is_merged(tmp_path, context, replica_spec):
    """The replica sees settings.env, the repository's env and the spec's env."""
    binary = fake_triton(tmp_path, 'echo "A=$A B=$B C=$C LD=$LD_LIBRARY_PATH"\nsleep 30\n')
    replica_spec.env = {"A": "from-spec"}
    replica_spec.repository.env = {"B": "from-repository"}
    ex = ProcessExecutor(LocalExecutorSettings(triton_binary=binary, env={"C": "cfg"}), context)
    replica = ex.start(replica_spec)
    try:
        text = wait_for(lambda: "A=" in (t := ex.logs(replica.replica_id)) and t)
        assert "A=from-spec B=from-repository C=cfg" in text
    finally:
        ex.stop(replica.replica_id, grace=1)


def test_replica_environment_is_an_allow_list(
    tmp_path, context, replica_spec, engine_secrets, monkeypatch
):
    """The engine's secrets stay out of a replica; PATH, CUDA settings and its own env get in."""
    binary = fake_triton(tmp_path, "env\nsleep 30\n")
    monkeypatch.setenv("CUDA_MODULE_LOADING", "LAZY")
    replica_spec.repository.env = {"AWS_ACCESS_KEY_ID": "repo-key-id"}
    ex = ProcessExecutor(LocalExecutorSettings(triton_binary=binary, env={"C": "cfg"}), context)
    replica = ex.start(replica_spec)
    try:
        text = wait_for(lambda: "AWS_ACCESS_KEY_ID=" in (t := ex.logs(replica.replica_id)) and t)
        assert "AWS_ACCESS_KEY_ID=repo-key-id" in text and "C=cfg" in text
        assert f"PATH={os.environ['PATH']}" in text and "CUDA_MODULE_LOADING=LAZY" in text
        for value in engine_secrets.values():
            assert value not in text
    finally:
        ex.stop(replica.replica_id, grace=1)


def test_apptainer_client_gets_its_settings_and_the_replica_env_only(
    tmp_path, context, replica_spec, engine_secrets, monkeypatch
):
    """apptainer runs with its own APPTAINER_* settings and APPTAINERENV_* for the container;
    the engine's secrets and its own APPTAINERENV_* variables are not passed on."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text("#!/bin/sh\nenv\nsleep 30\n")
    (bin_dir / "apptainer").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("APPTAINER_CACHEDIR", "/scratch/apptainer-cache")
    monkeypatch.setenv("APPTAINERENV_LEAK", "engine-apptainerenv")
    replica_spec.repository.env = {"AWS_ACCESS_KEY_ID": "repo-key-id"}
    settings = LocalExecutorSettings(
        mode="container", container_engine="apptainer", image="t.sif", env={"C": "cfg"}
    )
    ex = make_executor(settings=settings, context=context)
    replica = ex.start(replica_spec)
    try:
        text = wait_for(lambda: "APPTAINERENV_" in (t := ex.logs(replica.replica_id)) and t)
        assert "APPTAINERENV_AWS_ACCESS_KEY_ID=repo-key-id" in text
        assert "APPTAINERENV_C=cfg" in text
        assert "APPTAINER_CACHEDIR=/scratch/apptainer-cache" in text
        assert "engine-apptainerenv" not in text
        for value in engine_secrets.values():
            assert value not in text
    finally:
        ex.stop(replica.replica_id, grace=1)


def test_real_replica_and_its_stubs_get_no_engine_secrets(
    triton, context, replica_spec, identity_model, engine_secrets, check_replica_environ
):
    """tritonserver and its python backend stubs (read from /proc/PID/environ) carry none of the
    engine's secrets, but the variables of `[executor] env`, the repository and the spec."""
    replica_spec.repository.env = {"AWS_ACCESS_KEY_ID": "repo-key-id"}
    replica_spec.env = {"BIOENGINE_TEST_SPEC": "from-spec"}
    settings = LocalExecutorSettings(env={"BIOENGINE_TEST_CFG": "from-config"})
    ex = ProcessExecutor(settings, context)
    replica = ex.start(replica_spec)
    try:
        status = wait_ready(ex, replica.replica_id)
        expected = {
            "AWS_ACCESS_KEY_ID": "repo-key-id",
            "BIOENGINE_TEST_SPEC": "from-spec",
            "BIOENGINE_TEST_CFG": "from-config",
        }
        checked = check_replica_environ(status.details["pid"], engine_secrets, expected)
        assert len(checked) >= 2
    finally:
        ex.stop(replica.replica_id, grace=5)


def test_recycled_pid_is_not_mistaken_for_a_replica(context, replica_spec):
    """Metadata whose pid now belongs to another process is not adopted, and never killed."""
    ex = ProcessExecutor(LocalExecutorSettings(), context)
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        meta = {
            "replica_id": "stale-0001",
            "pid": victim.pid,
            "create_time": psutil.Process(victim.pid).create_time() - 1000,
            "ports": {"http": 1, "grpc": 2, "metrics": 3},
            "url": "http://127.0.0.1:1",
            "deployment": replica_spec.deployment,
            "labels": {"bioengine.deployment": replica_spec.deployment},
            "started_at": time.time(),
        }
        (ex.replica_dir / "stale-0001.json").write_text(json.dumps(meta))
        assert ex.list(replica_spec.deployment) == []
        ex.stop("stale-0001", grace=0.5)
        assert victim.poll() is None, "stop() killed a process that merely reused the pid"
    finally:
        victim.kill()
        victim.wait()


ENGINE = """
import sys, time
from pathlib import Path
from bioengine_core.contracts import BackendContext, ReplicaSpec, RepositoryLocation
from bioengine_executor_local import LocalExecutorSettings, ProcessExecutor
state, repo, deployment = sys.argv[1:4]
ctx = BackendContext(deployment=deployment, state_dir=Path(state), config_dir=Path(state))
ex = ProcessExecutor(LocalExecutorSettings(), ctx)
spec = ReplicaSpec(deployment=deployment, repository=RepositoryLocation(repo, Path(repo)))
status = ex.start(spec)
print(status.replica_id, flush=True)
time.sleep(600)
"""


def test_replica_survives_engine_kill_and_is_adopted(triton, context, replica_spec):
    """SIGKILL of the engine leaves its replica serving; the next engine adopts it, no duplicate."""
    engine = subprocess.Popen(
        [
            sys.executable,
            "-c",
            ENGINE,
            str(context.state_dir),
            replica_spec.repository.uri,
            replica_spec.deployment,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    ex = ProcessExecutor(LocalExecutorSettings(), context)
    try:
        replica_id = engine.stdout.readline().strip()
        assert replica_id
        os.kill(engine.pid, signal.SIGKILL)
        engine.wait()
        listed = wait_for(
            lambda: [s for s in ex.list(replica_spec.deployment) if s.state is ReplicaState.READY],
            timeout=60,
        )
        assert [s.replica_id for s in listed] == [replica_id]
        assert is_ready(listed[0].url)
        pid = listed[0].details["pid"]
        ex.stop(replica_id, grace=5)
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert not is_ready(listed[0].url)
    finally:
        if engine.poll() is None:
            engine.kill()
        for meta in ex._all_meta():
            ex.stop(meta["replica_id"], grace=1)


def test_preview_shows_command_without_secrets(triton, context, replica_spec):
    """preview() renders the tritonserver command line and hides secret-looking values."""
    replica_spec.repository.env = {"AWS_SECRET_ACCESS_KEY": "hunter2"}
    replica_spec.models = ["unet"]
    text = ProcessExecutor(LocalExecutorSettings(), context).preview(replica_spec)
    assert "tritonserver" in text and "--load-model=unet" in text
    assert f"--model-repository={replica_spec.repository.uri}" in text
    assert "hunter2" not in text and "AWS_SECRET_ACCESS_KEY=***" in text


def test_settings_reject_bad_values():
    """Misspelt keys and malformed GPU lists are rejected by the settings model."""
    with pytest.raises(ValidationError):
        LocalExecutorSettings(mode="vm")
    with pytest.raises(ValidationError):
        LocalExecutorSettings(gpus="first")
    with pytest.raises(ValidationError):
        LocalExecutorSettings(triton_bin="x")
    assert LocalExecutorSettings(gpus="0, 1").gpus == "0,1"


def test_plugin_is_registered_by_entry_point(context):
    """The installed distribution registers kind `local`, whose factory follows `mode`."""
    pm = PluginManager()
    registered = pm.get("executor", "local")
    assert registered is not None
    assert registered.plugin.distribution == "bioengine-executor-local"
    assert registered.record.settings is LocalExecutorSettings
    executor = make_executor(settings=LocalExecutorSettings(), context=context)
    assert isinstance(executor, ProcessExecutor)


def test_python_backend_replica_stops_cleanly(
    triton, context, replica_spec, identity_model, caplog
):
    """A replica that served a request, with the client connection still open, stops on SIGTERM.

    Triton waits `--exit-timeout-secs` for open connections (the router keeps them open); the
    executor sets it below the grace, so neither the server nor its stubs need SIGKILL.
    """
    ex = ProcessExecutor(LocalExecutorSettings(), context)
    replica = ex.start(replica_spec)
    try:
        status = wait_ready(ex, replica.replica_id)
        server = psutil.Process(status.details["pid"])
        stubs = server.children(recursive=True)
        assert stubs, "the python backend runs its model in a stub process"
        client = httpclient.InferenceServerClient(status.url.split("://", 1)[1])
        x = httpclient.InferInput("x", [4], "FP32")
        x.set_data_from_numpy(np.arange(4, dtype=np.float32))
        assert client.infer("ident", [x]).as_numpy("y").tolist() == [0, 1, 2, 3]
        with caplog.at_level("WARNING"):
            ex.stop(replica.replica_id, grace=30)  # generous: a loaded machine is slow, not wrong
        assert "SIGKILL" not in caplog.text, "needed SIGKILL"
        client.close()
        gone, alive = psutil.wait_procs([server, *stubs], timeout=5)
        assert not alive, alive
    finally:
        ex.stop(replica.replica_id, grace=1)
