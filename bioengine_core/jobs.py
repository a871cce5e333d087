"""Jobs: inference requests that take longer than a client should hold a connection.

A job is submitted with the same KServe body as `/infer`, runs in the engine (tiled when the
image needs it), reports progress as blocks done / total, keeps its answer for
`[engine] job_retention` seconds and can be cancelled. Job ids are random capability tokens:
whoever holds one (with an inference token) may read or cancel that job.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import BioEngineError, InferenceError

JOB_ID_RE = re.compile(r"^[A-Za-z0-9_-]{22}$")
JOB_TIMEOUT = 6 * 3600.0
"""How long one job may run (seconds)."""
MAX_JOBS = 100
"""Jobs kept at once (running and finished); beyond it submissions get 429."""


class JobCancelled(Exception):
    """Raised inside a running job once it was cancelled."""


@dataclass
class Job:
    """One submitted request: its state, progress and, once done, its answer."""

    id: str
    model: str
    state: str = "queued"  # queued, running, done, failed, cancelled
    done: int = 0
    total: int = 1
    error: str = ""
    created: float = field(default_factory=time.time)
    finished: float | None = None
    answer: tuple[int, bytes, dict[str, str]] | None = None
    task: asyncio.Task | None = None
    cancelled: bool = False

    def progress(self, done: int, total: int) -> None:
        """Called as blocks finish (from a worker thread); stops the job once cancelled."""
        if self.cancelled:
            raise JobCancelled()
        self.done, self.total = done, max(total, 1)

    def info(self) -> dict[str, Any]:
        """What `GET /bioengine/jobs/ID` answers."""
        return {
            "id": self.id,
            "model": self.model,
            "state": self.state,
            "progress": {"done": self.done, "total": self.total},
            "error": self.error or None,
            "created": self.created,
            "finished": self.finished,
        }


class JobStore:
    """The engine's jobs: submit, look up, cancel; finished ones expire after `retention` s."""

    def __init__(self, retention: float) -> None:
        self.retention = retention
        self.jobs: dict[str, Job] = {}

    def _expire(self) -> None:
        now = time.time()
        for jid, job in list(self.jobs.items()):
            if job.finished is not None and now - job.finished > self.retention:
                self.jobs.pop(jid, None)

    def submit(
        self, model: str, run: Callable[[Job], Awaitable[tuple[int, bytes, dict[str, str]]]]
    ) -> Job:
        """Start `run(job)` in the background; the new job (429 when too many are kept)."""
        self._expire()
        if len(self.jobs) >= MAX_JOBS:
            raise InferenceError(
                f"{MAX_JOBS} jobs are kept already; fetch or cancel finished ones, or wait "
                "for [engine] job_retention to expire them",
                status=429,
            )
        job = Job(secrets.token_urlsafe(16), model)
        self.jobs[job.id] = job
        job.task = asyncio.create_task(self._run(job, run), name=f"job {job.id}")
        return job

    async def _run(self, job: Job, run: Callable[[Job], Awaitable[Any]]) -> None:
        job.state = "running"
        try:
            job.answer = await run(job)
            status = job.answer[0]
            job.state = "done" if status == 200 else "failed"
            if status != 200:
                job.error = job.answer[1][:2000].decode(errors="replace")
            job.done = job.total
        except (JobCancelled, asyncio.CancelledError):
            job.state = "cancelled"
        except BioEngineError as exc:
            job.state, job.error = "failed", str(exc)
        except Exception as exc:  # a bug must not leave the job 'running' forever
            job.state, job.error = "failed", f"internal error: {type(exc).__name__}"
        finally:
            job.finished = time.time()

    def get(self, job_id: str) -> Job:
        """The job; 404 for an id that is malformed, unknown or expired."""
        self._expire()
        job = self.jobs.get(job_id) if JOB_ID_RE.fullmatch(job_id or "") else None
        if job is None:
            raise InferenceError(f"no job {job_id[:40]!r} (unknown or expired)", status=404)
        return job

    def cancel(self, job_id: str) -> Job:
        """Stop a queued or running job (its blocks in flight finish; no more start)."""
        job = self.get(job_id)
        if job.finished is None:
            job.cancelled = True
            if job.task is not None and job.done == 0:
                job.task.cancel()
        return job


__all__ = ["JOB_ID_RE", "JOB_TIMEOUT", "Job", "JobCancelled", "JobStore"]
