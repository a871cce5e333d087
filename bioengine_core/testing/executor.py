"""Executor conformance suite: importable pytest tests that every executor plugin must pass.

How to use it in a plugin's own tests (a complete example)::

    # plugins/executor_pbs/tests/test_conformance.py
    import pytest
    from bioengine_core.contracts import BackendContext, ReplicaSpec, RepositoryLocation
    from bioengine_core.testing.executor import ExecutorConformance
    from bioengine_executor_pbs import PbsExecutor, PbsSettings


    class TestPbsExecutor(ExecutorConformance):
        ready_timeout = 120.0            # a batch queue may take a while to run the job

        @pytest.fixture
        def context(self, tmp_path):
            return BackendContext(deployment="conf", state_dir=tmp_path, config_dir=tmp_path)

        @pytest.fixture
        def executor(self, context):
            ex = PbsExecutor(PbsSettings(), context)
            yield ex
            ex.close()

        @pytest.fixture
        def restarted_executor(self, context):
            # A *new* instance over the same state: what a restarted `bioengine serve` creates.
            return PbsExecutor(PbsSettings(), context)

        @pytest.fixture
        def replica_spec(self, tmp_path):
            repo = tmp_path / "repository"
            repo.mkdir()                 # an empty Triton model repository is enough
            return ReplicaSpec(deployment="conf",
                               repository=RepositoryLocation(uri=str(repo), local_path=repo))

The subclass name must start with `Test` so that pytest collects it. Fixtures you provide:

- `executor`: the executor under test (yield it to clean up clients afterwards);
- `restarted_executor`: a second, fresh instance configured exactly like `executor` and sharing
  its persistent state (state dir, cluster, namespace), standing in for a restarted engine;
- `replica_spec`: a `ReplicaSpec` whose repository Triton can open (an empty directory is fine).

They may also live in a `conftest.py`; if one is missing, pytest reports "fixture 'executor' not
found" for every test of the suite.

Executors with `manages_replicas = True` (a platform such as Kubernetes keeps the replicas
alive) subclass `ManagedExecutorConformance` instead, with the same fixtures: it drives them
through `scale()` (scale up, adopt after a restart, scale to zero) in place of `start()`/`stop()`.

Class attributes tune the timeouts (`ready_timeout`, `start_timeout`, `stop_timeout`,
`stop_grace`) and `unknown_replica_id` (an id your backend has never issued). Every replica a
test starts is stopped afterwards through the `launch` fixture, so a failing test does not leave
servers behind; override `cleanup_replica` if your backend needs more than `stop()`.
The replicas really run: the suite checks the URL they report with an HTTP GET of
`/v2/health/ready`, so it exercises your backend against the real infrastructure.
"""

from __future__ import annotations

import dataclasses
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import ClassVar

import pytest

from ..contracts import Executor, ReplicaSpec, ReplicaState, ReplicaStatus

DEPLOYMENT_LABEL = "bioengine.deployment"
"""Label key under which every replica carries its deployment name (what `list()` filters on)."""

EXTRA_LABEL = ("bioengine.conformance", "yes")
"""A label the suite adds to every spec; `list()` must report it back unchanged."""


def http_ready(url: str, timeout: float = 2.0) -> bool:
    """True when GET `url`/v2/health/ready answers 200 (the readiness probe of KServe v2)."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/v2/health/ready", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class ExecutorConformance:
    """Tests of the `contracts.Executor` contract; subclass it as `Test...` and add fixtures.

    See the module docstring for a complete example.
    """

    ready_timeout: ClassVar[float] = 60.0
    """Seconds a replica may take from `start()` until its status is READY."""
    start_timeout: ClassVar[float] = 15.0
    """Seconds `start()` itself may take (it must not wait for the server to become ready)."""
    stop_timeout: ClassVar[float] = 30.0
    """Seconds after `stop()` returns until `status()` must say STOPPED."""
    stop_grace: ClassVar[float] = 5.0
    """`grace` passed to `stop()`."""
    poll_interval: ClassVar[float] = 0.2
    unknown_replica_id: ClassVar[str] = "bioengine-conformance-never-started"
    """An id the backend never issued; `status()` of it must be STOPPED."""

    # ------------------------------------------------------------------ fixtures and helpers

    @pytest.fixture
    def spec(self, replica_spec: ReplicaSpec) -> ReplicaSpec:
        """The author's spec plus the suite's extra label (to check labels round-trip)."""
        labels = {**replica_spec.labels, EXTRA_LABEL[0]: EXTRA_LABEL[1]}
        return dataclasses.replace(replica_spec, labels=labels)

    @pytest.fixture
    def other_spec(self, spec: ReplicaSpec) -> ReplicaSpec:
        """The same spec for a different deployment (list() must not report it)."""
        return dataclasses.replace(spec, deployment=f"{spec.deployment}-other", labels={})

    def cleanup_replica(self, executor: Executor, replica_id: str) -> None:
        """Called at teardown for every replica a test started; override for extra cleanup."""
        executor.stop(replica_id, grace=self.stop_grace)

    @pytest.fixture
    def launch(self, executor: Executor) -> Iterator[Callable[..., ReplicaStatus]]:
        """`launch(spec)` starts a replica (timing it) and stops it again at teardown."""
        if executor.manages_replicas:
            pytest.fail(
                "the executor manages replicas itself: subclass ManagedExecutorConformance",
                pytrace=False,
            )
        started: list[str] = []

        def _launch(spec: ReplicaSpec, on: Executor | None = None) -> ReplicaStatus:
            ex = on or executor
            t0 = time.monotonic()
            status = ex.start(spec)
            elapsed = time.monotonic() - t0
            assert isinstance(status, ReplicaStatus), f"start() returned {status!r}"
            assert status.replica_id, "start() returned an empty replica_id"
            started.append(status.replica_id)
            assert elapsed <= self.start_timeout, (
                f"start() took {elapsed:.1f} s (limit {self.start_timeout} s): it must return "
                "at once and leave readiness to status()"
            )
            return status

        yield _launch
        errors = []
        for replica_id in started:
            try:
                self.cleanup_replica(executor, replica_id)
            except Exception as exc:  # noqa: BLE001 - report all, then fail once
                errors.append(f"{replica_id}: {exc}")
        assert not errors, f"stop() failed at teardown: {errors}"

    def wait_state(
        self, executor: Executor, replica_id: str, wanted: set[ReplicaState], timeout: float
    ) -> ReplicaStatus:
        """Poll `status()` until its state is in `wanted`; fail with the last status and logs."""
        deadline = time.monotonic() + timeout
        status = executor.status(replica_id)
        while status.state not in wanted and time.monotonic() < deadline:
            if status.state is ReplicaState.FAILED:
                break
            time.sleep(self.poll_interval)
            status = executor.status(replica_id)
        if status.state not in wanted:
            try:
                logs = executor.logs(replica_id, tail=30)
            except Exception as exc:  # noqa: BLE001 - only for the failure message
                logs = f"(logs() failed: {exc})"
            pytest.fail(
                f"replica {replica_id} is {status.state.value} ({status.message!r}), expected "
                f"{sorted(s.value for s in wanted)} within {timeout} s\nlogs:\n{logs}",
                pytrace=False,
            )
        return status

    def wait_ready(self, executor: Executor, replica_id: str) -> ReplicaStatus:
        """Wait for READY and check the reported URL answers the readiness probe."""
        status = self.wait_state(executor, replica_id, {ReplicaState.READY}, self.ready_timeout)
        assert status.url, f"READY replica {replica_id} reports no url"
        assert http_ready(status.url), f"{status.url}/v2/health/ready does not answer 200"
        return status

    # ------------------------------------------------------------------ tests: start / ready

    def test_start_returns_promptly_pending_or_starting(self, launch, spec) -> None:
        """start() returns at once, before the server is ready."""
        status = launch(spec)
        assert status.state in (ReplicaState.PENDING, ReplicaState.STARTING), (
            f"start() returned state {status.state.value}; expected pending or starting"
        )

    def test_replica_becomes_ready_and_url_answers(self, executor, launch, spec) -> None:
        """A started replica becomes READY and its url answers GET /v2/health/ready with 200."""
        replica = launch(spec)
        status = self.wait_ready(executor, replica.replica_id)
        assert status.replica_id == replica.replica_id

    def test_two_replicas_have_distinct_urls(self, executor, launch, spec) -> None:
        """Two replicas of one spec get different ids and different urls, both answering."""
        a, b = launch(spec), launch(spec)
        assert a.replica_id != b.replica_id
        sa, sb = self.wait_ready(executor, a.replica_id), self.wait_ready(executor, b.replica_id)
        assert sa.url != sb.url, f"both replicas report url {sa.url}"

    def test_methods_may_run_concurrently(self, executor, launch, spec) -> None:
        """The engine calls executor methods from several threads at once: two starts and the
        status of a running replica at the same time give distinct, consistent answers."""
        from concurrent.futures import ThreadPoolExecutor

        first = launch(spec)
        with ThreadPoolExecutor(4) as pool:
            starts = [pool.submit(launch, spec) for _ in range(2)]
            polls = [pool.submit(executor.status, first.replica_id) for _ in range(4)]
            started = [f.result() for f in starts]
            polled = [f.result() for f in polls]
        ids = {first.replica_id, *(s.replica_id for s in started)}
        assert len(ids) == 3, f"concurrent start() calls returned the same id: {ids}"
        assert all(p.replica_id == first.replica_id and p.state.alive for p in polled), polled
        for status in started:
            self.wait_ready(executor, status.replica_id)

    def test_logs_returns_text(self, executor, launch, spec) -> None:
        """logs() of a running replica returns a string (possibly empty while starting)."""
        replica = launch(spec)
        self.wait_ready(executor, replica.replica_id)
        text = executor.logs(replica.replica_id, tail=20)
        assert isinstance(text, str)

    def test_preview_returns_text(self, executor, spec) -> None:
        """preview(spec) renders what start(spec) would run, as a string."""
        text = executor.preview(spec)
        assert isinstance(text, str)

    # ------------------------------------------------------------------ tests: list / adopt

    def test_list_reports_replicas_of_its_deployment_only(
        self, executor, launch, spec, other_spec
    ) -> None:
        """list(deployment) reports alive replicas with their labels and ignores other deployments."""
        mine = launch(spec)
        other = launch(other_spec)
        self.wait_state(executor, mine.replica_id, {ReplicaState.READY}, self.ready_timeout)
        listed = {s.replica_id: s for s in executor.list(spec.deployment)}
        assert mine.replica_id in listed, f"list({spec.deployment!r}) misses {mine.replica_id}"
        assert other.replica_id not in listed, "list() reports a replica of another deployment"
        for status in listed.values():
            assert status.state.alive, f"list() reports a {status.state.value} replica"
            assert status.labels.get(DEPLOYMENT_LABEL) == spec.deployment, (
                f"replica {status.replica_id} lacks label {DEPLOYMENT_LABEL}={spec.deployment}: "
                f"{status.labels}"
            )
        got = listed[mine.replica_id].labels.get(EXTRA_LABEL[0])
        assert got == EXTRA_LABEL[1], f"the spec's label {EXTRA_LABEL[0]} came back as {got!r}"
        others = {s.replica_id for s in executor.list(other_spec.deployment)}
        assert other.replica_id in others and mine.replica_id not in others

    def test_list_omits_stopped_replicas(self, executor, launch, spec) -> None:
        """A stopped replica disappears from list()."""
        replica = launch(spec)
        self.wait_state(executor, replica.replica_id, {ReplicaState.READY}, self.ready_timeout)
        executor.stop(replica.replica_id, grace=self.stop_grace)
        self.wait_state(executor, replica.replica_id, {ReplicaState.STOPPED}, self.stop_timeout)
        ids = {s.replica_id for s in executor.list(spec.deployment)}
        assert replica.replica_id not in ids

    def test_restarted_executor_adopts_running_replicas(
        self, executor, restarted_executor, launch, spec
    ) -> None:
        """A new executor instance (a restarted engine) lists, inspects and stops old replicas."""
        replica = launch(spec)
        before = self.wait_ready(executor, replica.replica_id)
        adopted = {s.replica_id: s for s in restarted_executor.list(spec.deployment)}
        assert replica.replica_id in adopted, "a new executor instance does not list the replica"
        assert adopted[replica.replica_id].labels.get(DEPLOYMENT_LABEL) == spec.deployment
        status = self.wait_state(
            restarted_executor, replica.replica_id, {ReplicaState.READY}, self.ready_timeout
        )
        assert status.url == before.url, f"url changed after adoption: {before.url} -> {status.url}"
        restarted_executor.stop(replica.replica_id, grace=self.stop_grace)
        self.wait_state(
            restarted_executor, replica.replica_id, {ReplicaState.STOPPED}, self.stop_timeout
        )
        self.wait_state(executor, replica.replica_id, {ReplicaState.STOPPED}, self.stop_timeout)

    # ------------------------------------------------------------------ tests: stop / unknown

    def test_stop_stops_and_is_idempotent(self, executor, launch, spec) -> None:
        """stop() makes status STOPPED, the url stops answering, and a second stop() is a no-op."""
        replica = launch(spec)
        url = self.wait_ready(executor, replica.replica_id).url
        executor.stop(replica.replica_id, grace=self.stop_grace)
        self.wait_state(executor, replica.replica_id, {ReplicaState.STOPPED}, self.stop_timeout)
        deadline = time.monotonic() + self.stop_timeout
        while http_ready(url, timeout=1.0) and time.monotonic() < deadline:
            time.sleep(self.poll_interval)
        assert not http_ready(url, timeout=1.0), f"{url} still answers after stop()"
        executor.stop(replica.replica_id, grace=self.stop_grace)
        assert executor.status(replica.replica_id).state is ReplicaState.STOPPED

    def test_stop_unknown_replica_is_noop(self, executor) -> None:
        """stop() of an id that never existed does not raise."""
        executor.stop(self.unknown_replica_id, grace=self.stop_grace)

    def test_status_of_unknown_replica_is_stopped(self, executor) -> None:
        """status() of an id the backend never issued is STOPPED."""
        assert executor.status(self.unknown_replica_id).state is ReplicaState.STOPPED


class ManagedExecutorConformance(ExecutorConformance):
    """The suite for executors with `manages_replicas = True`: replicas come from `scale()`.

    Same fixtures and attributes as ExecutorConformance; the tests that call `start()` are
    replaced by the `test_scale_*` tests below, the others (unknown ids, preview) still apply.
    """

    test_start_returns_promptly_pending_or_starting = None
    test_replica_becomes_ready_and_url_answers = None
    test_two_replicas_have_distinct_urls = None
    test_logs_returns_text = None
    test_list_reports_replicas_of_its_deployment_only = None
    test_list_omits_stopped_replicas = None
    test_restarted_executor_adopts_running_replicas = None
    test_stop_stops_and_is_idempotent = None
    test_methods_may_run_concurrently = None

    # ------------------------------------------------------------------ tests: scale()

    @pytest.fixture
    def scaled(self, executor: Executor, spec: ReplicaSpec) -> Iterator[Callable[[int], None]]:
        """`scaled(n)` calls scale(spec, n) on a managing executor; scales to 0 at teardown."""
        if not executor.manages_replicas:
            pytest.fail("ManagedExecutorConformance needs manages_replicas = True", pytrace=False)
        yield lambda n: executor.scale(spec, n)
        executor.scale(spec, 0)

    def wait_listed(
        self, executor: Executor, deployment: str, count: int, timeout: float
    ) -> list[ReplicaStatus]:
        """Poll list() until exactly `count` replicas are listed, all READY when count > 0."""
        deadline = time.monotonic() + timeout
        while True:
            listed = executor.list(deployment)
            if len(listed) == count and all(s.state is ReplicaState.READY for s in listed):
                return listed
            if time.monotonic() > deadline:
                pytest.fail(
                    f"list({deployment!r}) shows {[(s.replica_id, s.state.value) for s in listed]}"
                    f", expected {count} ready replica(s) within {timeout} s",
                    pytrace=False,
                )
            time.sleep(self.poll_interval)

    def test_scale_up_reports_ready_replicas(self, executor, scaled, spec, other_spec) -> None:
        """scale(spec, 2) yields two READY replicas with distinct answering urls and labels."""
        scaled(2)
        listed = self.wait_listed(executor, spec.deployment, 2, self.ready_timeout)
        urls = {s.url for s in listed}
        assert len(urls) == 2 and all(u and http_ready(u) for u in urls), urls
        for status in listed:
            assert status.labels.get(DEPLOYMENT_LABEL) == spec.deployment, status.labels
            assert executor.status(status.replica_id).state is ReplicaState.READY
        assert executor.list(other_spec.deployment) == []

    def test_scale_restarted_executor_adopts(
        self, executor, restarted_executor, scaled, spec
    ) -> None:
        """A new executor instance lists the replicas that scale() created."""
        scaled(1)
        (before,) = self.wait_listed(executor, spec.deployment, 1, self.ready_timeout)
        (after,) = self.wait_listed(restarted_executor, spec.deployment, 1, self.ready_timeout)
        assert (after.replica_id, after.url) == (before.replica_id, before.url)

    def test_scale_to_zero_removes_replicas(self, executor, scaled, spec) -> None:
        """scale(spec, 0) removes every replica; their urls stop answering."""
        scaled(1)
        (status,) = self.wait_listed(executor, spec.deployment, 1, self.ready_timeout)
        scaled(0)
        self.wait_listed(executor, spec.deployment, 0, self.stop_timeout)
        deadline = time.monotonic() + self.stop_timeout
        while http_ready(status.url, timeout=1.0) and time.monotonic() < deadline:
            time.sleep(self.poll_interval)
        assert not http_ready(status.url, timeout=1.0), f"{status.url} answers after scale(0)"
