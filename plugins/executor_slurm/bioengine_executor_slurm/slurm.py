"""Talk to Slurm through its command-line tools: sbatch, squeue (JSON or text), sacct, scancel.

Every call goes through `bioengine_core.commands.run_command`, so a failure carries the command,
exit code and stderr, and transient controller errors are retried. pyslurm is not used: it
cannot be built against every Slurm a site runs, while the CLI is always there.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bioengine_core.childenv import child_env
from bioengine_core.commands import run_command
from bioengine_core.errors import CommandError, ExecutorError

from .jobenv import JOB_ALLOW, SBATCH_ALLOW, SLURM_CLIENT_ALLOW
from .states import ALIVE_STATES

log = logging.getLogger(__name__)

# stderr fragments of errors that go away when the controller is reachable again.
TRANSIENT_ERRORS = (
    "Socket timed out",
    "Unable to contact slurm controller",
    "Slurm temporarily unable to accept job",
    "Resource temporarily unavailable",
    "Zero Bytes were transmitted or received",
    "Connection refused",
    "Connection timed out",
    "Transport endpoint is not connected",
)


@dataclass
class Job:
    """One Slurm job as squeue or sacct reports it (the fields BioEngine uses)."""

    job_id: str
    name: str
    state: str
    user: str = ""
    reason: str = ""
    comment: str = ""
    partition: str = ""
    nodes: str = ""
    start_time: float | None = None
    end_time: float | None = None
    time_limit_s: float | None = None
    exit_code: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def alive(self) -> bool:
        """True while the job is pending or running."""
        return self.state in ALIVE_STATES

    @property
    def expires_at(self) -> float | None:
        """When Slurm will end the job: its start time plus its time limit (running jobs)."""
        if self.state != "RUNNING" or not self.start_time or self.time_limit_s is None:
            return None
        return self.start_time + self.time_limit_s


def parse_duration(text: str) -> float | None:
    """Seconds in a Slurm duration (`M:SS`, `H:MM:SS`, `D-HH:MM:SS`, `D-HH`); None if unlimited."""
    text = (text or "").strip()
    if not text or text.upper() in ("UNLIMITED", "INFINITE", "NOT_SET", "INVALID", "N/A"):
        return None
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = int(d)
        parts = [int(p) for p in text.split(":")]
        while len(parts) < 3:
            parts.append(0)  # D-HH, D-HH:MM
        h, m, s = parts
    else:
        parts = [int(p) for p in text.split(":")]
        if len(parts) == 1:
            h, m, s = 0, parts[0], 0  # plain minutes
        elif len(parts) == 2:
            h, m, s = 0, parts[0], parts[1]
        else:
            h, m, s = parts
    return float(((days * 24 + h) * 60 + m) * 60 + s)


def _parse_time(text: str) -> float | None:
    text = (text or "").strip()
    if not text or text in ("N/A", "Unknown", "NONE", "None"):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _number(value: Any) -> Any:
    """Unwrap Slurm's JSON number forms (plain, or {"set", "infinite", "number"} in newer APIs)."""
    if isinstance(value, dict):
        if value.get("infinite"):
            return None
        if not value.get("set", True):
            return None
        return value.get("number")
    return value


def job_from_json(item: dict[str, Any]) -> Job:
    """A Job from one entry of `squeue --json` (openapi v0.0.38 and later layouts)."""
    state = item.get("job_state", "")
    if isinstance(state, list):  # newer Slurm: a list of flags, the base state first
        state = state[0] if state else ""
    limit = _number(item.get("time_limit"))
    start = _number(item.get("start_time")) or None
    end = _number(item.get("end_time")) or None
    exit_code = item.get("exit_code")
    if isinstance(exit_code, dict):  # newer Slurm: {"status": [...], "return_code": N}
        exit_code = _number(exit_code.get("return_code"))
    elif isinstance(exit_code, int) and exit_code > 255:  # v0.0.38: a raw wait status
        exit_code = exit_code >> 8
    return Job(
        job_id=str(item.get("job_id", "")),
        name=item.get("name", "") or "",
        state=str(state).upper(),
        user=item.get("user_name", "") or "",
        reason=item.get("state_reason", "") or "",
        comment=item.get("comment", "") or "",
        partition=item.get("partition", "") or "",
        nodes=item.get("nodes", "") or "",
        start_time=float(start) if start else None,
        end_time=float(end) if end else None,
        time_limit_s=float(limit) * 60 if limit is not None else None,
        exit_code=exit_code if isinstance(exit_code, int) else None,
        raw=item,
    )


# squeue text format: one line per job, fields separated by a character no field contains.
TEXT_FIELDS = ("%i", "%j", "%T", "%u", "%r", "%k", "%P", "%N", "%S", "%e", "%l")
SEP = "\x1f"


def job_from_text(line: str) -> Job | None:
    """A Job from one line of `squeue -h -o` with TEXT_FIELDS."""
    parts = line.rstrip("\n").split(SEP)
    if len(parts) != len(TEXT_FIELDS):
        return None
    job_id, name, state, user, reason, comment, partition, nodes, start, end, limit = parts
    return Job(
        job_id=job_id.strip(),
        name=name,
        state=state.strip().upper(),
        user=user,
        reason=reason,
        comment="" if comment == "(null)" else comment,
        partition=partition,
        nodes=nodes,
        start_time=_parse_time(start),
        end_time=_parse_time(end),
        time_limit_s=parse_duration(limit),
    )


def submission_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The environment sbatch runs with: ours, minus the SLURM_* variables of an enclosing job.

    When `serve` itself runs inside a Slurm job, its SLURM_JOB_ID, SLURM_CPUS_PER_TASK, ...
    must not leak into the replica jobs (Slurm's default `--export=ALL` would copy them);
    SLURM_CONF, which selects the cluster, is kept.
    """
    return {k: v for k, v in environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}


def job_environment(
    environ: Mapping[str, str],
    extra: Mapping[str, str] | None = None,
    *,
    allow: tuple[str, ...] = (),
) -> dict[str, str]:
    """sbatch's environment, which becomes the job's: allow-listed variables of `environ`
    (PATH, locale, modules, container runtime settings, `allow`) plus `extra` (the replica's
    own variables, e.g. S3 credentials); never the SLURM_* variables of an enclosing job."""
    return child_env(extra, allow=(*SBATCH_ALLOW, *JOB_ALLOW, *allow), base=submission_env(environ))


class SlurmCLI:
    """sbatch/squeue/sacct/scancel with retries of transient controller errors."""

    def __init__(
        self,
        *,
        squeue_format: str = "auto",
        sacct: str = "auto",
        retries: int = 3,
        retry_delay: float = 2.0,
        timeout: float = 30.0,
    ):
        self.squeue_format = squeue_format
        self.sacct_mode = sacct
        self.retries = retries
        self.retry_delay = retry_delay
        self.timeout = timeout
        self._json_ok: bool | None = None if squeue_format == "auto" else squeue_format == "json"
        self._sacct_ok: bool | None = None if sacct == "auto" else sacct == "yes"
        self.user = getpass.getuser()

    def run(
        self, cmd: list[str], *, input: str | None = None, env: Mapping[str, str] | None = None
    ) -> str:
        """Run a Slurm command with the retry policy; CommandError on failure.

        Without `env` the command gets only the base variables and SLURM_CONF: no secret of the
        engine, and no SQUEUE_*/SLURM_TIME_FORMAT defaults that would change what it prints.
        """
        if env is None:
            env = child_env(allow=SLURM_CLIENT_ALLOW, base=submission_env(os.environ))
        return run_command(
            cmd,
            input=input,
            env=env,
            timeout=self.timeout,
            retries=self.retries,
            retry_delay=self.retry_delay,
            retry_if=TRANSIENT_ERRORS,
        )

    # ------------------------------------------------------------------ submit / cancel
    def submit(
        self, script: str, *, env: Mapping[str, str] | None = None, allow: tuple[str, ...] = ()
    ) -> str:
        """Submit a batch script on stdin with `sbatch --parsable`; returns the job id.

        The job's environment is exactly sbatch's (`--export=ALL`), and sbatch gets only the
        variables a job needs (`job_environment`) plus `env`: no other variable of `serve`.
        """
        out = self.run(
            ["sbatch", "--parsable", "--export=ALL"],
            input=script,
            env=job_environment(os.environ, env, allow=allow),
        )
        line = out.strip().splitlines()[-1] if out.strip() else ""
        job_id = line.split(";")[0].strip()
        if not job_id.isdigit():
            raise ExecutorError(f"sbatch did not print a job id: {out.strip()!r}")
        return job_id

    def cancel(self, job_id: str, *, signal: str | None = None) -> None:
        """`scancel` one job (terminate, or send `signal` to all of its processes)."""
        cmd = ["scancel"]
        if signal:
            cmd += [f"--signal={signal}", "--full"]
        try:
            self.run(cmd + [job_id])
        except CommandError as exc:
            if "Invalid job id" in exc.stderr or "already completing or completed" in exc.stderr:
                return
            raise

    # ------------------------------------------------------------------ query
    def jobs(self, *, name: str | None = None, job_id: str | None = None) -> list[Job]:
        """Jobs known to the controller (pending, running and recently ended) of this user.

        Filtered by job `name` or `job_id`; with `squeue --json`, whose filters older Slurm
        ignores, the filtering happens here.
        """
        if self._json_ok is not False:
            try:
                jobs = self._jobs_json()
                self._json_ok = True
            except (CommandError, ValueError, KeyError) as exc:
                stderr = exc.stderr if isinstance(exc, CommandError) else ""
                if self._json_ok or any(m in stderr for m in TRANSIENT_ERRORS):
                    # worked before, or the controller is away: not a missing feature
                    raise ExecutorError(f"squeue failed: {exc}") from exc
                log.info("squeue --json unavailable (%s); using the text format", exc)
                self._json_ok = False
                jobs = self._jobs_text(name=name, job_id=job_id)
        else:
            jobs = self._jobs_text(name=name, job_id=job_id)
        return [
            j
            for j in jobs
            if (not self.user or not j.user or j.user == self.user)
            and (name is None or j.name == name)
            and (job_id is None or j.job_id == job_id)
        ]

    def _jobs_json(self) -> list[Job]:
        out = self.run(["squeue", "--json"])
        data = json.loads(out)
        errors = [e for e in data.get("errors", []) if e]
        if errors and not data.get("jobs"):
            raise ValueError(f"squeue --json reported errors: {errors}")
        return [job_from_json(item) for item in data["jobs"]]

    def _jobs_text(self, *, name: str | None, job_id: str | None) -> list[Job]:
        cmd = ["squeue", "-h", "-t", "all", f"--user={self.user}", "-o", SEP.join(TEXT_FIELDS)]
        if name:
            cmd.append(f"--name={name}")
        if job_id:
            cmd.append(f"--jobs={job_id}")
        try:
            out = self.run(cmd)
        except CommandError as exc:
            if job_id and "Invalid job id" in exc.stderr:
                return []  # purged from the controller's memory
            raise
        return [job for line in out.splitlines() if (job := job_from_text(line))]

    # ------------------------------------------------------------------ accounting
    def accounting_enabled(self) -> bool:
        """Whether `sacct` can answer (accounting storage configured); probed once."""
        if self._sacct_ok is None:
            try:
                out = self.run(["scontrol", "show", "config"])
                match = re.search(r"^AccountingStorageType\s*=\s*(\S+)", out, re.M)
                self._sacct_ok = bool(match) and match.group(1) != "accounting_storage/none"
            except CommandError:
                self._sacct_ok = False
        return self._sacct_ok

    def sacct(self, job_id: str) -> Job | None:
        """The job as accounting recorded it (for jobs the controller no longer remembers)."""
        if not self.accounting_enabled():
            return None
        try:
            out = self.run(
                [
                    "sacct",
                    "-n",
                    "-P",
                    "-X",
                    "-j",
                    job_id,
                    "-o",
                    "JobID,JobName,State,User,Reason,Partition,NodeList,Start,End,"
                    "Timelimit,ExitCode",
                ]
            )
        except CommandError as exc:
            log.warning("sacct failed: %s", exc)
            return None
        for line in out.splitlines():
            parts = line.split("|")
            if len(parts) != 11 or parts[0] != job_id:
                continue
            jid, name, state, user, reason, part, nodes, start, end, limit, code = parts
            try:
                exit_code = int(code.split(":")[0])
            except ValueError:
                exit_code = None
            return Job(
                job_id=jid,
                name=name,
                state=state.split()[0].upper(),
                user=user,
                reason=reason,
                partition=part,
                nodes=nodes,
                start_time=_parse_time(start),
                end_time=_parse_time(end),
                time_limit_s=parse_duration(limit),
                exit_code=exit_code,
            )
        return None


def sbatch_hint(stderr: str) -> str:
    """Advice for common sbatch rejections."""
    text = stderr.lower()
    if "requested node configuration is not available" in text or "can not be satisfied" in text:
        return (
            "the request (CPUs, memory, GPUs or constraint in [executor]) exceeds every node "
            "of the partition; lower it or choose another partition"
        )
    if "invalid account" in text or "invalid qos" in text:
        return "check [executor] account and qos (`sacctmgr show assoc user=$USER`)"
    if "invalid partition" in text:
        return "check [executor] partition (`sinfo -s` lists them)"
    if "time limit" in text:
        return "[executor] time_limit exceeds what the partition or QOS allows"
    return ""
