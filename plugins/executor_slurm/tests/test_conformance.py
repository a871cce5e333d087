"""The SLURM executor passes the core's executor conformance suite on a real cluster."""

from __future__ import annotations

import pytest

from bioengine_core.testing.executor import ExecutorConformance

pytestmark = [pytest.mark.slurm, pytest.mark.triton, pytest.mark.usefixtures("slurm_cluster")]


class TestSlurmExecutor(ExecutorConformance):
    """Each replica is a real batch job running the pip-shipped tritonserver."""

    ready_timeout = 90.0
    stop_timeout = 30.0
    unknown_replica_id = "999999999"

    @pytest.fixture
    def executor(self, make_executor):
        ex = make_executor()
        yield ex
        ex.close()

    @pytest.fixture
    def restarted_executor(self, make_executor):
        # A new instance over the same state dir, reading squeue as text this time.
        return make_executor(squeue_format="text")

    @pytest.fixture
    def replica_spec(self, spec):
        return spec
