"""The SLURM executor: each Triton replica is one batch job; its id is the Slurm job id.

A job is marked as ours by its name (`SHORT.N`: the deployment's short form and the replica's
slot), its comment (`bioengine:bioengine.deployment=DEPLOYMENT,...`) and its user; that is how a
restarted `serve` adopts running jobs, and why stop never touches anybody else's job. The job
runs `python -m bioengine_executor_slurm.launch`, which publishes `host:port` in a shared
endpoint directory once Triton answers ready. One squeue answer (reused for `poll_interval`
seconds) serves the status of every replica.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from bioengine_core.contracts import (
    BackendContext,
    Executor,
    ReplicaSpec,
    ReplicaState,
    ReplicaStatus,
)
from bioengine_core.errors import CommandError, ExecutorError
from bioengine_core.triton import find_triton, is_ready
from bioengine_core.util import DEPLOYMENT_LABEL, read_json

from .script import (
    ScriptPaths,
    comment_deployment,
    job_name,
    names_deployment,
    parse_comment,
    render_script,
    replica_env,
    slot_of,
)
from .settings import SlurmSettings
from .slurm import Job, SlurmCLI, sbatch_hint
from .states import (
    OUTSIDE,
    ended_message,
    pending_message,
    signalled,
    translate,
    why_completing,
)

log = logging.getLogger(__name__)


class SlurmExecutor(Executor):
    """Runs each Triton replica as a Slurm batch job and tracks it with squeue."""

    manages_replicas = False

    def __init__(self, settings: SlurmSettings, context: BackendContext):
        self.settings = settings
        self.context = context
        state_dir = (
            context.resolve_path(settings.state_dir)
            if settings.state_dir
            else Path(context.state_dir) / "slurm"
        )
        self.paths = ScriptPaths(state_dir)
        self.template_path = context.resolve_path(settings.template) if settings.template else None
        self.cli = SlurmCLI(
            squeue_format=settings.squeue_format,
            sacct=settings.sacct,
            retries=settings.command_retries,
            timeout=settings.command_timeout,
        )
        self._lock = threading.Lock()
        self._snapshot: dict[str, Job] = {}
        self._snapshot_at = 0.0
        self._known: set[str] = set()  # jobs this instance started or adopted
        self._submit_lock = threading.Lock()  # one slot choice + sbatch at a time
        self._deployments = {context.deployment}
        self._fit: str | None = None
        self._last_labels: dict[str, dict[str, str]] = {}  # for answers while Slurm is away
        self._pruned = False

    # ------------------------------------------------------------------ squeue snapshot
    def _jobs(self, max_age: float | None = None) -> dict[str, Job]:
        """Our user's jobs by id, from an squeue answer at most `max_age` seconds old."""
        max_age = self.settings.poll_interval if max_age is None else max_age
        with self._lock:
            if time.monotonic() - self._snapshot_at > max_age:
                jobs = self.cli.jobs()
                self._snapshot = {j.job_id: j for j in jobs}
                self._snapshot_at = time.monotonic()
            return self._snapshot

    def _invalidate(self) -> None:
        with self._lock:
            self._snapshot_at = 0.0

    def _lookup(self, job_id: str, *, fresh: bool = False) -> Job | None:
        """The job as squeue (or, for forgotten jobs, sacct) knows it; None if unknown."""
        jobs = self._jobs(0.0 if fresh else None)
        job = jobs.get(job_id)
        if job is None and not fresh:
            job = self._jobs(0.5).get(job_id)
        if job is None:
            job = self.cli.sacct(job_id)
        return job

    def _of(self, job: Job, deployment: str) -> bool:
        """Whether `job` is a replica of `deployment`: its name and its comment say so (the
        legacy `PREFIX-DEPLOYMENT` names: the name alone)."""
        if not names_deployment(self.settings, deployment, job.name):
            return False
        return bool(self.settings.job_name_prefix) or comment_deployment(job.comment) == deployment

    def _ours(self, job: Job) -> bool:
        mine = job.job_id in self._known or any(self._of(job, d) for d in self._deployments)
        return mine and (not job.user or not self.cli.user or job.user == self.cli.user)

    def next_slot(self, deployment: str) -> int:
        """The lowest replica slot (1, 2, ...) no alive job of `deployment` uses: the N of the
        next job's name `SHORT.N`."""
        used = {
            slot_of(job.name)
            for job in self._jobs(0.0).values()
            if job.alive and self._of(job, deployment)
        }
        slot = 1
        while slot in used:
            slot += 1
        return slot

    # ------------------------------------------------------------------ state files
    def _endpoint(self, job_id: str) -> dict[str, Any] | None:
        return read_json(self.paths.endpoints / f"{job_id}.json")

    def _exit(self, job_id: str) -> dict[str, Any] | None:
        return read_json(self.paths.endpoints / f"{job_id}.exit.json")

    def _stopped(self, job_id: str) -> bool:
        return (self.paths.stopped / job_id).exists()

    def _mark_stopped(self, job_id: str) -> None:
        self.paths.ensure()
        (self.paths.stopped / job_id).write_text(f"{time.time()}\n")

    def _output_file(self, job_id: str, name: str | None = None) -> Path | None:
        if name:
            path = self.paths.logs / f"{name}-{job_id}.out"
            if path.exists():
                return path
        found = sorted(self.paths.logs.glob(f"*-{job_id}.out"))
        return found[0] if found else None

    # ------------------------------------------------------------------ Executor API
    def preview(self, spec: ReplicaSpec, *, slot: int = 1) -> str:
        """The batch script `start(spec)` submits as replica `slot` (`next_slot()` says which
        slot the next start takes)."""
        return render_script(
            self.settings, spec, self.paths, template_path=self.template_path, slot=slot
        )

    def start(self, spec: ReplicaSpec) -> ReplicaStatus:
        """Submit one replica job with `sbatch --parsable`; returns PENDING at once.

        A submission Slurm refuses is an ExecutorError of one line: Slurm's reason and which
        `[executor]` key to change, to what the partition's nodes have (`config check`'s words).
        """
        self.paths.ensure()
        if not self._pruned:
            self._pruned = True
            self.paths.prune()
        env = replica_env(self.settings, spec)
        self._deployments.add(spec.deployment)
        with self._submit_lock:
            slot = self.next_slot(spec.deployment)
            script = self.preview(spec, slot=slot)
            try:
                job_id = self.cli.submit(script, env=env, allow=tuple(self.settings.pass_env))
            except CommandError as exc:
                raise ExecutorError(self._rejected(exc)) from exc
            self._invalidate()
        name = job_name(self.settings, spec.deployment, slot)
        self._known.add(job_id)
        scripts = self.paths.state_dir / "scripts"
        scripts.mkdir(parents=True, exist_ok=True)
        (scripts / f"{job_id}.sh").write_text(script)
        log.info("submitted Slurm job %s (%s)", job_id, name)
        return ReplicaStatus(
            replica_id=job_id,
            state=ReplicaState.PENDING,
            message=f"submitted as Slurm job {job_id}",
            labels=self._labels(spec.deployment, job_id, spec.labels),
            details=self._details(job_id, name),
        )

    def _rejected(self, exc: CommandError) -> str:
        """One line for a refused submission: Slurm's reason, then what to change."""
        lines = [line.strip() for line in (exc.stderr or exc.stdout or "").splitlines()]
        lines = [line.removeprefix("sbatch: error:").strip() for line in lines if line]
        reason = next(
            (line.split("failed:", 1)[1].strip() for line in lines if "failed:" in line),
            lines[-1] if lines else f"exit code {exc.returncode}",
        )
        fit = self._what_to_change()
        advice = fit or sbatch_hint(exc.stderr or "") or "see the sbatch options in [executor]"
        return f"sbatch rejected the replica job ({reason}): {advice}"

    def status(self, replica_id: str) -> ReplicaStatus:
        """PENDING (with Slurm's reason), STARTING, READY, FAILED (with why), STOPPED.

        While the controller does not answer (after retries), a replica whose Triton still
        answers ready stays READY, and any other reads UNKNOWN: a Slurm outage alone never takes
        a serving replica out of the rotation.
        """
        try:
            return self._status_of(replica_id)
        except ExecutorError as exc:
            endpoint = self._endpoint(replica_id)
            url = endpoint.get("url") if endpoint else None
            why = f"Slurm does not answer: {exc}".strip()
            if url and not self._stopped(replica_id) and is_ready(url):
                return ReplicaStatus(
                    replica_id,
                    ReplicaState.READY,
                    url=url,
                    host=endpoint.get("host"),
                    message=f"Triton is ready ({why.splitlines()[0]})",
                    labels=self._last_labels.get(
                        replica_id, self._labels(self.context.deployment, replica_id)
                    ),
                    details=self._details(replica_id, None),
                )
            return ReplicaStatus(replica_id, ReplicaState.UNKNOWN, url=url, message=why)

    def _status_of(self, replica_id: str) -> ReplicaStatus:
        job = self._lookup(replica_id)
        if job is not None and not self._ours(job):
            return ReplicaStatus(
                replica_id,
                ReplicaState.STOPPED,
                message=f"Slurm job {replica_id} is not a job of this deployment",
            )
        if (
            job is not None
            and job.alive
            and job.state == "RUNNING"
            and not self._stopped(replica_id)
        ):
            endpoint = self._endpoint(replica_id)
            if endpoint is not None and is_ready(endpoint.get("url", "")):
                return self._status(job, ReplicaState.READY, "Triton is ready", endpoint)
            if endpoint is not None or self._exit(replica_id) is not None:
                # Triton stopped answering or ended: ask Slurm afresh whether the job ended.
                job = self._lookup(replica_id, fresh=True) or job
        if job is not None and not self._stopped(replica_id):
            if job.state == "COMPLETING":
                job = self._settle(replica_id, job, {"COMPLETING"})
            elif job.state == "RUNNING" and self._exit(replica_id) is not None:
                job = self._settle(replica_id, job, {"RUNNING", "COMPLETING"})
        return self._classify(replica_id, job)

    def _settle(self, job_id: str, job: Job, states: set[str], timeout: float = 3.0) -> Job:
        """Wait briefly for an ending job's final state (CANCELLED, TIMEOUT, ...): it says why."""
        deadline = time.monotonic() + timeout
        while job.state in states and time.monotonic() < deadline:
            time.sleep(0.5)
            job = self._lookup(job_id, fresh=True) or job
        return job

    def _classify(self, job_id: str, job: Job | None) -> ReplicaStatus:
        """The replica's status from its job (None: unknown to Slurm), the stop marker and the
        launcher's files; the Slurm state is translated by `states.TRANSLATE_TABLE`."""
        exit_info = self._exit(job_id)
        if job is None:
            return self._gone(job_id, exit_info)
        if self._stopped(job_id):
            return self._stopping(job)
        if job.state == "RUNNING":
            return self._running(job, exit_info)
        if job.state == "PENDING":
            message, can_wait = pending_message(job.reason)
            fit = "" if can_wait else self._what_to_change()
            if fit:  # what to change first, Slurm's words after
                message = f"{fit} (Slurm job {job.job_id}: {message})"
            status = self._status(job, ReplicaState.PENDING, message)
            status.unsatisfiable = not can_wait
            return status
        meaning = translate(job.state)
        if meaning.state.alive:
            return self._status(job, meaning.state, meaning.message)
        return self._status(job, ReplicaState.FAILED, ended_message(job, exit_info))

    def _what_to_change(self) -> str:
        """For a job that can never start: which [executor] keys exceed the partition (what
        `config check` says; '' when it finds nothing), asked once per executor."""
        if self._fit is None:
            from .preflight import preflight

            try:
                self._fit = "; ".join(
                    preflight(settings=self.settings, context=self.context, offline=False)
                )
            except Exception:  # advice only: the job's own reason is already in the message
                self._fit = ""
        return self._fit

    def _gone(self, job_id: str, exit_info: dict[str, Any] | None) -> ReplicaStatus:
        """A job Slurm no longer knows: STOPPED if we stopped it (or never had it), else FAILED."""
        if self._stopped(job_id):
            return ReplicaStatus(job_id, ReplicaState.STOPPED, message="stopped")
        if exit_info is not None or job_id in self._known:
            why = exit_info.get("reason", "") if exit_info else ""
            return ReplicaStatus(
                job_id,
                ReplicaState.FAILED,
                message=f"Slurm job {job_id} ended and is no longer known to Slurm"
                + (f" ({OUTSIDE})" if exit_info and signalled(exit_info) else "")
                + (f"; launcher: {why}" if why else ""),
                details=self._details(job_id, None),
            )
        return ReplicaStatus(job_id, ReplicaState.STOPPED, message=f"no Slurm job {job_id}")

    def _stopping(self, job: Job) -> ReplicaStatus:
        """A job we cancelled: STOPPING until Slurm has it ended, then STOPPED."""
        if job.alive:
            return self._status(job, ReplicaState.STOPPING, "cancelled, waiting for it to end")
        state = ReplicaState.STOPPING if job.state == "COMPLETING" else ReplicaState.STOPPED
        return self._status(job, state, f"stopped (Slurm state {job.state})")

    def _running(self, job: Job, exit_info: dict[str, Any] | None) -> ReplicaStatus:
        """A running job whose Triton does not answer ready: STARTING, or FAILED once the
        launcher reported that Triton ended."""
        if exit_info is not None:
            # Slurm may still say RUNNING for a moment after scancel: the launcher's record
            # (stopped by a signal BioEngine did not send) already tells why it is ending.
            why = why_completing(job, exit_info)
            return self._status(
                job,
                ReplicaState.FAILED,
                f"Slurm job {job.job_id} {job.state}: {why}; launcher: "
                f"{exit_info.get('reason', '')}",
            )
        meaning = translate(job.state)
        endpoint = self._endpoint(job.job_id)
        if endpoint is None:
            since = time.strftime("%H:%M:%S", time.localtime(job.start_time or 0))
            return self._status(
                job,
                meaning.state,
                f"{meaning.message} on {job.nodes or '?'} since {since}; waiting for Triton "
                f"to be ready",
            )
        return self._status(
            job,
            meaning.state,
            f"Triton at {endpoint.get('url')} does not answer ready",
            endpoint,
        )

    def _status(
        self, job: Job, state: ReplicaState, message: str, endpoint: dict[str, Any] | None = None
    ) -> ReplicaStatus:
        deployment = comment_deployment(job.comment) or self.context.deployment
        labels = self._labels(deployment, job.job_id, parse_comment(job.comment))
        self._last_labels[job.job_id] = labels
        return ReplicaStatus(
            replica_id=job.job_id,
            state=state,
            url=endpoint.get("url") if endpoint else None,
            host=endpoint.get("host") if endpoint else (job.nodes or None),
            message=message,
            labels=labels,
            started_at=job.start_time if job.state != "PENDING" else None,
            expires_at=job.expires_at,
            details=self._details(job.job_id, job.name, job),
        )

    def _labels(
        self, deployment: str, job_id: str, extra: dict[str, str] | None = None
    ) -> dict[str, str]:
        return {**(extra or {}), DEPLOYMENT_LABEL: deployment, "slurm.job_id": job_id}

    def _details(self, job_id: str, name: str | None, job: Job | None = None) -> dict[str, Any]:
        out = self._output_file(job_id, name)
        details: dict[str, Any] = {
            "job_id": job_id,
            "job_name": name,
            "output": str(out) if out else str(self.paths.logs / f"{name or '*'}-{job_id}.out"),
            "endpoint_file": str(self.paths.endpoints / f"{job_id}.json"),
        }
        if job is not None:
            details.update(
                slurm_state=job.state,
                reason=job.reason,
                node=job.nodes,
                partition=job.partition,
                time_limit_s=job.time_limit_s,
            )
        return details

    def stop(self, replica_id: str, *, grace: float = 10.0) -> None:
        """scancel our job (TERM, then KILL after `grace` s); never touches other jobs."""
        job = self._lookup(replica_id, fresh=True)
        if job is None:
            if replica_id in self._known:
                self._mark_stopped(replica_id)
            return
        if not self._ours(job):
            log.warning(
                "not cancelling Slurm job %s (%s of %s): not a job of this deployment",
                replica_id,
                job.name,
                job.user,
            )
            return
        self._mark_stopped(replica_id)
        if not job.alive and job.state != "COMPLETING":
            return
        self.cli.cancel(replica_id)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            time.sleep(0.5)
            job = self.cli.jobs(job_id=replica_id)
            current = job[0] if job else None
            if current is None or (not current.alive and current.state != "COMPLETING"):
                break
        else:
            log.warning(
                "Slurm job %s still running %.0f s after scancel: sending KILL", replica_id, grace
            )
            self.cli.cancel(replica_id, signal="KILL")
        (self.paths.endpoints / f"{replica_id}.json").unlink(missing_ok=True)
        self._invalidate()

    def logs(self, replica_id: str, *, tail: int = 200) -> str:
        """The last `tail` lines of the job's output file (launcher and tritonserver)."""
        path = self._output_file(replica_id)
        if path is None:
            job = self._lookup(replica_id)
            if job is not None and job.state == "PENDING":
                return f"(Slurm job {replica_id} is pending ({job.reason}); no output yet)\n"
            return f"(no output file for Slurm job {replica_id} in {self.paths.logs})\n"
        lines = path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-tail:]) + ("\n" if lines else "")

    def list(self, deployment: str) -> list[ReplicaStatus]:
        """Alive jobs of `deployment` (by name and comment) of this user (adoption after a
        restart)."""
        self._deployments.add(deployment)
        jobs = self._jobs(0.0)
        found = []
        for job in sorted(jobs.values(), key=lambda j: int(j.job_id) if j.job_id.isdigit() else 0):
            if not self._of(job, deployment) or not job.alive or self._stopped(job.job_id):
                continue
            if self.cli.user and job.user and job.user != self.cli.user:
                continue
            self._known.add(job.job_id)
            found.append(self.status(job.job_id))
        return [s for s in found if s.state.alive]

    def triton_backends(self) -> list[str]:
        """Backends of the Triton the jobs run (detected locally, or a container's)."""
        if self.settings.container != "none":
            return list(self.settings.container_backends)
        try:
            backends = find_triton(self.settings.triton_binary).backends
        except ExecutorError:
            return ["python"]
        return backends or ["python"]
