"""BioEngine's executor conformance suite against a real sshd and a real Triton.

The "remote host" is this machine reached over ssh, so the Triton found locally (`find_triton`)
is the remote one too. Defaults match BioEngine's `.ci/start-sshd.sh` (root on 127.0.0.1:2222,
key /tmp/bioengine-sshd/client_key); override with BIOENGINE_SSH_HOST, _PORT, _USER and _KEY.
"""

import os
import sys

import pytest
from bioengine_executor_ssh import SshExecutor, SshSettings

from bioengine_core.contracts import BackendContext, ReplicaSpec, RepositoryLocation
from bioengine_core.errors import BioEngineError
from bioengine_core.testing.executor import ExecutorConformance
from bioengine_core.testing.pytest_plugin import require_service
from bioengine_core.triton import find_triton

HOST = os.environ.get("BIOENGINE_SSH_HOST", "127.0.0.1")
PORT = int(os.environ.get("BIOENGINE_SSH_PORT", "2222"))
USER = os.environ.get("BIOENGINE_SSH_USER", "root")
KEY = os.environ.get("BIOENGINE_SSH_KEY", "/tmp/bioengine-sshd/client_key")


@pytest.fixture(scope="module")
def triton_settings() -> dict:
    """Where Triton is on the (local) remote host, and the environment it needs there."""
    try:
        install = find_triton()
    except BioEngineError as exc:
        require_service(False, f"tritonserver ({exc})")
    return {
        "tritonserver": str(install.binary),
        "backend_directory": str(install.backend_dir) if install.backend_dir else None,
        "backends": install.backends,
        "env": install.env,  # LD_LIBRARY_PATH for the python backend stub
        "python": sys.executable,
    }


@pytest.fixture
def context(tmp_path) -> BackendContext:
    """The engine's context: a deployment name and local directories."""
    return BackendContext(deployment="conf", state_dir=tmp_path, config_dir=tmp_path)


@pytest.fixture
def settings(tmp_path, triton_settings) -> SshSettings:
    """Settings for the test host with a fresh remote state directory per test."""
    settings = SshSettings(
        host=HOST,
        port=PORT,
        user=USER,
        identity_file=KEY,
        ssh_options=["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "LogLevel=ERROR"],
        state_dir=str(tmp_path / "remote-state"),
        bind_address="127.0.0.1",
        **triton_settings,
    )
    try:
        SshExecutor(settings, BackendContext("probe", tmp_path, tmp_path)).list("probe")
    except BioEngineError as exc:
        require_service(False, f"sshd at {USER}@{HOST}:{PORT} ({exc})")
    return settings


class TestSshExecutor(ExecutorConformance):
    """The whole suite; only the three fixtures below are specific to ssh."""

    @pytest.fixture
    def executor(self, settings, context):
        """The executor under test; stops whatever a failed test may have left behind."""
        executor = SshExecutor(settings, context)
        yield executor
        for deployment in ("conf", "conf-other"):
            for replica in executor.list(deployment):
                executor.stop(replica.replica_id, grace=1)

    @pytest.fixture
    def restarted_executor(self, settings, context):
        """A second instance over the same remote state: a restarted engine."""
        return SshExecutor(settings, context)

    @pytest.fixture
    def replica_spec(self, tmp_path) -> ReplicaSpec:
        """An empty model repository (a path on the remote host, which is this host)."""
        repo = tmp_path / "repository"
        repo.mkdir()
        return ReplicaSpec(deployment="conf", repository=RepositoryLocation(uri=str(repo)))
