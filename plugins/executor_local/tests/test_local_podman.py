"""Container mode for real: the conformance suite with podman (+runc) running the real Triton.

The image comes from `.ci/build-podman-image.sh` (a minimal Debian built with debootstrap, as no
registry is reachable); the host's nvidia-pytriton installation and Python are bind-mounted into
the container, so the tritonserver inside is the real one. Locally the tests skip without podman
or the image; in CI (CI=true) they fail instead.
"""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest
import tritonclient.http as httpclient
from bioengine_executor_local import ContainerExecutor, LocalExecutorSettings

from bioengine_core.contracts import ReplicaState
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
    deadline = time.monotonic() + 90
    status = ex.status(replica.replica_id)
    while status.state is not ReplicaState.READY and time.monotonic() < deadline:
        assert status.state.alive, status.message
        time.sleep(0.3)
        status = ex.status(replica.replica_id)
    assert status.state is ReplicaState.READY, ex.logs(replica.replica_id)
    client = httpclient.InferenceServerClient(status.url.split("://", 1)[1])
    x = httpclient.InferInput("x", [4], "FP32")
    x.set_data_from_numpy(np.arange(4, dtype=np.float32))
    assert client.infer("ident", [x]).as_numpy("y").tolist() == [0, 1, 2, 3]
    t0 = time.monotonic()
    ex.stop(replica.replica_id, grace=60)  # client connection still open; generous under load
    assert time.monotonic() - t0 < 60, "podman stop had to SIGKILL (grace ran out)"
    client.close()
    assert ex.status(replica.replica_id).state is ReplicaState.STOPPED
