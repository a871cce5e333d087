"""Container mode for real: the conformance suite with podman (+runc) running the real Triton.

The image comes from `.ci/build-podman-image.sh` (a minimal Debian built with debootstrap, as no
registry is reachable); the host's nvidia-pytriton installation and Python are bind-mounted into
the container, so the tritonserver inside is the real one. Locally the tests skip without podman
or the image; in CI (CI=true) they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from bioengine_executor_local import ContainerExecutor, LocalExecutorSettings

from bioengine_core.contracts import ReplicaState, ReplicaStatus
from bioengine_core.testing.environ import environ_of
from bioengine_core.testing.executor import ExecutorConformance
from bioengine_core.testing.podman import IMAGE, PODMAN_OPTIONS, podman_image_available
from bioengine_core.testing.pytest_plugin import require_service
from bioengine_core.triton import find_triton


@pytest.fixture
def podman() -> None:
    """Require podman and the local test image (skip locally, fail in CI)."""
    require_service(
        podman_image_available(), f"podman with image {IMAGE} (run .ci/build-podman-image.sh)"
    )


def podman_settings(**kw) -> LocalExecutorSettings:
    """Container mode running the host's pip-shipped tritonserver inside the test image."""
    install = find_triton()
    # The serving environment (tritonserver, its libraries, numpy for python-backend models) and
    # the Python it was made from, at the same paths as on the host.
    mounts = []
    for path in sorted({sys.prefix, sys.base_prefix}):
        mounts += ["--volume", f"{path}:{path}:ro"]
    # The python backend stub finds its packages through the venv's python on PATH.
    env = {**install.env, "PATH": f"{sys.prefix}/bin:/usr/local/bin:/usr/bin:/bin"}
    options = dict(
        container_engine="podman",
        image=IMAGE,
        container_triton=str(install.binary),
        container_options=PODMAN_OPTIONS + mounts,
        triton_args=[f"--backend-directory={install.backend_dir}"],
        env=env,
        container_backends=list(install.backends),
        stop_grace=5,
    )
    options.update(kw)
    return LocalExecutorSettings(mode="container", **options)


def wait_ready(ex: ContainerExecutor, replica_id: str, timeout: float = 90.0) -> ReplicaStatus:
    """The replica's status once READY; fails at once when it is no longer alive."""
    deadline = time.monotonic() + timeout
    status = ex.status(replica_id)
    while status.state is not ReplicaState.READY and time.monotonic() < deadline:
        assert status.state.alive, status.message
        time.sleep(0.3)
        status = ex.status(replica_id)
    assert status.state is ReplicaState.READY, ex.logs(replica_id)
    return status


def recording_podman(bin_dir: Path, client_log: Path) -> str:
    """A `podman` wrapper in `bin_dir` that appends each call's environment to `client_log`
    before running the real podman (put `bin_dir` first on PATH); returns the real one."""
    real_podman = shutil.which("podman")
    bin_dir.mkdir()
    wrapper = bin_dir / "podman"
    wrapper.write_text(
        f"#!/bin/sh\n{{ echo '--- podman'; env; }} >> {client_log}\nexec {real_podman} \"$@\"\n"
    )
    wrapper.chmod(0o755)
    return real_podman


@pytest.fixture
def remove_containers(deployment):
    """Remove every container of the test's deployments afterwards, whatever happened."""
    yield
    for dep in (deployment, f"{deployment}-other"):
        out = subprocess.run(
            ["podman", "ps", "-aq", "--filter", f"label=bioengine.deployment={dep}"],
            capture_output=True,
            text=True,
        ).stdout.split()
        if out:
            subprocess.run(["podman", "rm", "-f", *out], capture_output=True)


@pytest.mark.podman
class TestPodmanConformance(ExecutorConformance):
    """The conformance suite against real podman containers."""

    ready_timeout = 90.0
    start_timeout = 15.0

    @pytest.fixture
    def executor(self, podman, remove_containers, context):
        return ContainerExecutor(podman_settings(), context)

    @pytest.fixture
    def restarted_executor(self, context):
        return ContainerExecutor(podman_settings(), context)


@pytest.mark.podman
def test_exited_container_is_failed_with_exit_code(
    podman, remove_containers, context, replica_spec, identity_model
):
    """A container whose server exits is FAILED with the exit code and its output."""
    ex = ContainerExecutor(podman_settings(container_triton="/bin/sh", triton_args=[]), context)
    # `/bin/sh --model-repository=...` fails at once: dash rejects the option (exit code 2)
    replica = ex.start(replica_spec)
    deadline = time.monotonic() + 60
    status = ex.status(replica.replica_id)
    while status.state is not ReplicaState.FAILED and time.monotonic() < deadline:
        time.sleep(0.3)
        status = ex.status(replica.replica_id)
    assert status.state is ReplicaState.FAILED, status
    assert "exit code 2" in status.message, status.message
    assert "Illegal option" in status.message
    ex.stop(replica.replica_id)
    assert ex.status(replica.replica_id).state is ReplicaState.STOPPED
    assert "Illegal option" in ex.logs(replica.replica_id)  # kept after removal


@pytest.mark.podman
def test_python_backend_model_serves_from_container(
    podman, remove_containers, context, replica_spec, identity_model
):
    """A python-backend model loads and answers inside the container; stop needs no SIGKILL."""
    ex = ContainerExecutor(podman_settings(), context)
    replica = ex.start(replica_spec)
    status = wait_ready(ex, replica.replica_id)
    client = httpclient.InferenceServerClient(status.url.split("://", 1)[1])
    x = httpclient.InferInput("x", [4], "FP32")
    x.set_data_from_numpy(np.arange(4, dtype=np.float32))
    assert client.infer("ident", [x]).as_numpy("y").tolist() == [0, 1, 2, 3]
    t0 = time.monotonic()
    ex.stop(replica.replica_id, grace=60)  # client connection still open; generous under load
    assert time.monotonic() - t0 < 60, "podman stop had to SIGKILL (grace ran out)"
    client.close()
    assert ex.status(replica.replica_id).state is ReplicaState.STOPPED


@pytest.mark.podman
def test_container_and_its_stubs_get_no_engine_secrets(
    podman,
    remove_containers,
    tmp_path,
    monkeypatch,
    context,
    replica_spec,
    identity_model,
    engine_secrets,
    check_replica_environ,
):
    """Every podman client call, the containerised tritonserver and its python backend stubs
    (read from /proc/PID/environ on the host) carry none of the engine's secrets. The client
    gets what podman reads (PODMAN_*, proxies); the container only `[executor] env`, the
    repository's variables (`--env NAME`) and the spec's, not the client's proxy settings."""
    bin_dir = tmp_path / "bin"
    client_log = tmp_path / "podman-client-env.log"
    real_podman = recording_podman(bin_dir, client_log)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("PODMAN_IGNORE_CGROUPSV1_WARNING", "1")
    monkeypatch.setenv("http_proxy", "http://proxy-user:proxy-pass@127.0.0.1:9")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    replica_spec.repository.env = {"AWS_ACCESS_KEY_ID": "repo-key-id"}
    replica_spec.env = {"BIOENGINE_TEST_SPEC": "from-spec"}
    env = {**podman_settings().env, "BIOENGINE_TEST_CFG": "from-config"}
    ex = ContainerExecutor(podman_settings(env=env), context)
    replica = ex.start(replica_spec)
    status = wait_ready(ex, replica.replica_id)
    pid = int(
        subprocess.run(
            [real_podman, "inspect", "--format", "{{.State.Pid}}", status.details["container"]],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    )
    expected = {
        "AWS_ACCESS_KEY_ID": "repo-key-id",
        "BIOENGINE_TEST_SPEC": "from-spec",
        "BIOENGINE_TEST_CFG": "from-config",
    }
    for proc in check_replica_environ(pid, engine_secrets, expected):
        raw, _ = environ_of(proc.pid)
        assert b"proxy-pass" not in raw and b"PODMAN_IGNORE" not in raw, proc
    ex.stop(replica.replica_id, grace=30)
    calls = client_log.read_text()
    assert calls.count("--- podman") >= 3  # run, inspect, stop, logs, rm
    for key, value in engine_secrets.items():
        assert value not in calls, f"{key} reached the podman client"
    assert "AWS_ACCESS_KEY_ID=repo-key-id" in calls  # `--env NAME` copies it from the client
    assert "PODMAN_IGNORE_CGROUPSV1_WARNING=1" in calls and "proxy-pass" in calls
