"""A replica job that runs Triton inside a podman container, for real.

The image comes from `.ci/build-podman-image.sh` (a minimal Debian; no registry is reachable
here); the host's Python environment with the pip-shipped tritonserver is bind-mounted into it,
so the server inside the container is the real one. Skips locally without podman or the image;
fails in CI.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from bioengine_core.contracts import ReplicaState
from bioengine_core.testing.podman import IMAGE, PODMAN_OPTIONS, podman_image_available
from bioengine_core.testing.pytest_plugin import require_service
from bioengine_core.triton import find_triton, is_ready

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.podman,
    pytest.mark.triton,
    pytest.mark.usefixtures("slurm_cluster"),
]


def wait_state(executor, replica_id, states, timeout=120.0):
    """Poll status() until one of `states`; fail with the job output."""
    import time

    deadline = time.monotonic() + timeout
    status = executor.status(replica_id)
    while status.state not in states and time.monotonic() < deadline:
        time.sleep(0.5)
        status = executor.status(replica_id)
    assert status.state in states, f"{status.state.value}: {status.message}\n" + executor.logs(
        replica_id, tail=30
    )
    return status


def test_podman_replica_job_becomes_ready_and_leaves_no_container(make_executor, spec):
    """container = "podman": the job runs Triton in a container; scancel removes the container."""
    require_service(podman_image_available(), f"podman with image {IMAGE}")
    install = find_triton()
    mounts = []
    for path in sorted({sys.prefix, sys.base_prefix}):
        mounts += ["--volume", f"{path}:{path}:ro"]
    options = PODMAN_OPTIONS + mounts + [f"--env=LD_LIBRARY_PATH={install.env['LD_LIBRARY_PATH']}"]
    executor = make_executor(
        container="podman",
        image=IMAGE,
        container_triton=str(install.binary),
        container_options=options,
        triton_args=[f"--backend-directory={install.backend_dir}"],
    )
    script = executor.preview(spec)
    assert "--container podman" in script and "--bind " + str(spec.repository.local_path) in script
    status = executor.start(spec)
    name = f"bioengine-{status.replica_id}"
    try:
        ready = wait_state(executor, status.replica_id, {ReplicaState.READY})
        assert is_ready(ready.url)
        running = subprocess.run(
            ["podman", "ps", "--filter", f"name={name}", "--format", "{{.Names}}"],
            capture_output=True,
            text=True,
        ).stdout.split()
        assert running == [name]
        assert "podman run --rm --network=host" in executor.logs(status.replica_id)
    finally:
        executor.stop(status.replica_id, grace=10)
    wait_state(executor, status.replica_id, {ReplicaState.STOPPED}, 30)
    left = subprocess.run(
        ["podman", "ps", "-a", "--filter", f"name={name}", "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
    ).stdout.split()
    if left:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True)
    assert left == [], f"container {name} outlived its job"
