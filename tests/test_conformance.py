"""The conformance suites pass for the reference backends and catch deliberately broken ones."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from bioengine_core.contracts import ReplicaSpec, RepositoryLocation
from bioengine_core.storage_local import LocalStorage
from bioengine_core.testing.executor import ExecutorConformance, ManagedExecutorConformance
from bioengine_core.testing.memory import FAULTS, ManagedMemoryExecutor, MemoryExecutor
from bioengine_core.testing.storage import StorageConformance

pytest_plugins = ["pytester"]


class TestMemoryExecutor(ExecutorConformance):
    """The in-memory reference executor passes the executor suite."""

    ready_timeout = 10.0

    @pytest.fixture
    def namespace(self):
        name = f"conf-{uuid.uuid4().hex[:8]}"
        yield name
        MemoryExecutor.reset(name)

    @pytest.fixture
    def executor(self, namespace):
        return MemoryExecutor(namespace)

    @pytest.fixture
    def restarted_executor(self, namespace):
        return MemoryExecutor(namespace)

    @pytest.fixture
    def replica_spec(self, tmp_path: Path) -> ReplicaSpec:
        repo = tmp_path / "repository"
        repo.mkdir()
        return ReplicaSpec(
            deployment="conformance", repository=RepositoryLocation(str(repo), local_path=repo)
        )


class TestManagedMemoryExecutor(ManagedExecutorConformance, TestMemoryExecutor):
    """The in-memory executor in the managed style passes the managed suite (scale())."""

    @pytest.fixture
    def executor(self, namespace):
        return ManagedMemoryExecutor(namespace)

    @pytest.fixture
    def restarted_executor(self, namespace):
        return ManagedMemoryExecutor(namespace)


class TestLocalStorage(StorageConformance):
    """The built-in local-directory storage passes the storage suite."""

    @pytest.fixture
    def storage(self, tmp_path: Path) -> LocalStorage:
        return LocalStorage(tmp_path / "repository")


# --------------------------------------------------------------------------- the suite can fail

BROKEN_SUITE = """
import uuid
import pytest
from bioengine_core.contracts import ReplicaSpec, RepositoryLocation
from bioengine_core.testing.executor import ExecutorConformance, ManagedExecutorConformance
from bioengine_core.testing.memory import BrokenExecutor, MemoryExecutor


class TestBroken({base}):
    ready_timeout = 3.0
    stop_timeout = 1.0
    poll_interval = 0.05

    @pytest.fixture
    def namespace(self):
        name = "broken-" + uuid.uuid4().hex[:8]
        yield name
        MemoryExecutor.reset()  # the broken stop() leaves servers behind

    @pytest.fixture
    def executor(self, namespace):
        return BrokenExecutor(namespace, faults=[{fault!r}], ready_delay=0.1, managed={managed})

    @pytest.fixture
    def restarted_executor(self, namespace):
        return BrokenExecutor(namespace, faults=[{fault!r}], ready_delay=0.1, managed={managed})

    @pytest.fixture
    def replica_spec(self, tmp_path):
        return ReplicaSpec(deployment="broken", repository=RepositoryLocation(str(tmp_path)))
"""

PYTESTER_INI = "[pytest]\nasyncio_default_fixture_loop_scope = function\n"

# Which tests of the suite each fault must fail (at least these; the fault may break more).
EXPECTED_FAILURES = {
    "stop_noop": {"test_stop_stops_and_is_idempotent", "test_list_omits_stopped_replicas"},
    "list_drops_labels": {"test_list_reports_replicas_of_its_deployment_only"},
    "list_all_deployments": {"test_list_reports_replicas_of_its_deployment_only"},
    "no_adoption": {"test_restarted_executor_adopts_running_replicas"},
    "start_blocks": {"test_start_returns_promptly_pending_or_starting"},
    "unknown_is_failed": {"test_status_of_unknown_replica_is_stopped"},
    "same_url": {"test_two_replicas_have_distinct_urls"},
    "scale_down_ignored": {"test_scale_to_zero_removes_replicas"},
}
MANAGED_FAULTS = {"scale_down_ignored"}
"""Faults of the scale() path: the suite runs them against a managing executor."""


def test_every_fault_has_an_expectation() -> None:
    """Each fault BrokenExecutor offers is exercised below."""
    assert set(EXPECTED_FAILURES) == set(FAULTS)


@pytest.mark.parametrize("fault", sorted(EXPECTED_FAILURES))
def test_suite_reports_broken_executor(pytester: pytest.Pytester, fault: str) -> None:
    """Running the suite against a BrokenExecutor fails the tests guarding the broken rule."""
    pytester.makeini(PYTESTER_INI)
    managed = fault in MANAGED_FAULTS
    base = "ManagedExecutorConformance" if managed else "ExecutorConformance"
    source = BROKEN_SUITE.format(fault=fault, managed=managed, base=base)
    pytester.makepyfile(test_broken=source)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) + outcomes.get("errors", 0) > 0, result.stdout.str()
    reports = result.reprec.getreports("pytest_runtest_logreport")  # type: ignore[attr-defined]
    failed = {r.nodeid.rsplit("::", 1)[-1] for r in reports if r.failed}
    missing = EXPECTED_FAILURES[fault] - failed
    assert not missing, f"fault {fault}: expected failures {missing}; failed: {sorted(failed)}"
    assert outcomes.get("passed", 0) > 0, "the suite should still pass the unbroken rules"


def test_suite_passes_reference_executor_in_pytester(pytester: pytest.Pytester) -> None:
    """The same pytester harness reports no failure for the unbroken MemoryExecutor."""
    source = BROKEN_SUITE.format(fault="x", managed=False, base="ExecutorConformance").replace(
        "BrokenExecutor(namespace, faults=['x'], ready_delay=0.1, managed=False)",
        "MemoryExecutor(namespace, ready_delay=0.1)",
    )
    pytester.makeini(PYTESTER_INI)
    pytester.makepyfile(test_reference=source)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q")
    from bioengine_core.testing.executor import ExecutorConformance

    count = sum(1 for name in dir(ExecutorConformance) if name.startswith("test_"))
    result.assert_outcomes(passed=count)
