"""What Slurm's job states and reasons mean for a replica, in one table (as Parsl's providers'
`translate_table`), and in words for the operator.

`TRANSLATE_TABLE` maps a Slurm job state to the replica's state and a message; a job that is in
a state the table does not know has ended. Pending reasons say whether waiting can help
(`explain_reason`), and the reason of an ended job may come with a hint (`REASON_HINTS`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, NamedTuple

from bioengine_core.contracts import ReplicaState

if TYPE_CHECKING:
    from .slurm import Job


class Translation(NamedTuple):
    """What a Slurm job state means for the replica the job runs."""

    state: ReplicaState
    """The replica's state while its job is in this Slurm state (BioEngine did not stop it;
    STARTING for a running job until its Triton answers ready)."""
    message: str
    """The Slurm state in words (refined with the pending reason or the job's node)."""


_P, _S, _F = ReplicaState.PENDING, ReplicaState.STARTING, ReplicaState.FAILED

TRANSLATE_TABLE: dict[str, Translation] = {
    # the job may still run
    "PENDING": Translation(_P, "pending in Slurm"),
    "RUNNING": Translation(_S, "job running"),
    "CONFIGURING": Translation(_P, "Slurm state CONFIGURING"),
    "SUSPENDED": Translation(_P, "Slurm state SUSPENDED"),
    "REQUEUED": Translation(_P, "Slurm state REQUEUED"),
    "REQUEUE_FED": Translation(_P, "Slurm state REQUEUE_FED"),
    "REQUEUE_HOLD": Translation(_P, "Slurm state REQUEUE_HOLD"),
    "RESIZING": Translation(_P, "Slurm state RESIZING"),
    "SIGNALING": Translation(_P, "Slurm state SIGNALING"),
    "STAGE_OUT": Translation(_P, "Slurm state STAGE_OUT"),
    "RESV_DEL_HOLD": Translation(_P, "Slurm state RESV_DEL_HOLD"),
    # the job ended (or is ending) without BioEngine stopping it
    "TIMEOUT": Translation(_F, "the job reached its Slurm time limit"),
    "NODE_FAIL": Translation(_F, "the job's node failed"),
    "PREEMPTED": Translation(_F, "the job was preempted by Slurm"),
    "BOOT_FAIL": Translation(_F, "the job's node failed to boot"),
    "DEADLINE": Translation(_F, "the job reached its deadline"),
    "OUT_OF_MEMORY": Translation(_F, "the job ran out of memory"),
    "CANCELLED": Translation(
        _F,
        "the job was cancelled outside BioEngine (scancel by a user, an administrator or a policy)",
    ),
    "FAILED": Translation(_F, "the job failed"),
    "COMPLETED": Translation(_F, "the job ended (the launcher exited)"),
    "COMPLETING": Translation(_F, "the job is ending"),
    "SPECIAL_EXIT": Translation(_F, "the job ended with a special exit state"),
    "REVOKED": Translation(_F, "the job was revoked (federation)"),
}

ALIVE_STATES = frozenset(name for name, t in TRANSLATE_TABLE.items() if t.state.alive)
"""Job states in which a job may still run (or runs)."""


def translate(slurm_state: str) -> Translation:
    """The replica's state and message for a job in `slurm_state` (an unknown state: ended)."""
    found = TRANSLATE_TABLE.get(slurm_state)
    if found is None:
        return Translation(_F, f"the job ended in Slurm state {slurm_state}")
    return found


# Pending reasons that will not clear by waiting: the request itself does not fit.
UNSATISFIABLE_REASONS = {
    "PartitionConfig": "the job asks for more than the partition's nodes offer "
    "(check [executor] cpus, memory, gpus, time_limit against the partition)",
    "BadConstraints": "no node satisfies the job's constraints "
    "(check [executor] cpus, memory, gpus, constraint)",
    "PartitionNodeLimit": "the job asks for more nodes than the partition allows",
    "PartitionTimeLimit": "the job's time limit exceeds the partition's maximum "
    "(lower [executor] time_limit)",
    "InvalidAccount": "the account is not valid (check [executor] account)",
    "InvalidQOS": "the QOS is not valid (check [executor] qos)",
    "QOSMaxCpuPerJobLimit": "the job asks for more CPUs than its QOS allows "
    "(lower [executor] cpus or change qos)",
    "QOSMaxGRESPerJob": "the job asks for more GPUs than its QOS allows "
    "(lower [executor] gpus or change qos)",
    "QOSMaxWallDurationPerJobLimit": "the job's time limit exceeds its QOS's maximum "
    "(lower [executor] time_limit or change qos)",
    "AccountNotAllowed": "the account may not use this partition "
    "(check [executor] account and partition)",
    "QOSNotAllowed": "the QOS may not be used on this partition "
    "(check [executor] qos and partition)",
}
# Pending reasons that waiting resolves.
WAIT_REASONS = {
    "Resources": "waiting for free resources",
    "Priority": "waiting behind higher-priority jobs",
    "Dependency": "waiting for a dependency",
    "BeginTime": "waiting for its begin time",
    "JobHeldUser": "held by a user (scontrol release)",
    "JobHeldAdmin": "held by an administrator",
    "None": "waiting to be scheduled",
    # maintenance and outages end: wait (up to [engine] ready_timeout) rather than give up
    "ReqNodeNotAvail": "a required node is not available now (down, drained or reserved); "
    "the job starts when it returns",
    "PartitionDown": "the partition is down (maintenance?); the job starts when it is up",
    "PartitionInactive": "the partition is inactive; the job starts when it is active",
    "NodeDown": "a required node is down; the job starts when it returns",
}
# Why Slurm says a job failed, in words (the reason of an ended job).
REASON_HINTS = {
    "JobLaunchFailure": "Slurm could not launch the batch script; is the state_dir (job output "
    "directory) present and shared with the compute node?",
    "RaisedSignal": "the launcher died from a signal",
    "OutOfMemory": "the job exceeded its memory (raise [executor] memory)",
}


def explain_reason(reason: str) -> tuple[str, bool]:
    """A pending reason in words, and whether waiting can resolve it."""
    if reason in UNSATISFIABLE_REASONS:
        return UNSATISFIABLE_REASONS[reason], False
    return WAIT_REASONS.get(reason, "waiting"), True


def pending_message(reason: str) -> tuple[str, bool]:
    """The message of a PENDING job with Slurm's `reason`, and whether it can ever start."""
    words, can_wait = explain_reason(reason)
    message = f"{translate('PENDING').message} (reason: {reason or 'None'}): {words}"
    if not can_wait:
        message += "; it will not start unless the request or the cluster changes"
    return message, can_wait


OUTSIDE = (
    "cancelled outside BioEngine (scancel by a user, an administrator or a policy) or preempted"
)


def signalled(exit_info: dict[str, Any]) -> bool:
    """Whether the launcher's exit record says the job was sent a signal (scancel, preemption,
    time limit) rather than its Triton ending on its own."""
    return bool(exit_info.get("stopped_by")) or "stopped by" in exit_info.get("reason", "")


def why_completing(job: Job, exit_info: dict[str, Any] | None) -> str:
    """Why a job BioEngine did not stop is ending, before Slurm shows its final state."""
    limit_end = (job.start_time or 0) + (job.time_limit_s or 0)
    # A job Slurm still shows RUNNING has its planned end as end_time: judge by the clock.
    ended = time.time() if job.state == "RUNNING" else job.end_time
    if job.time_limit_s and ended and ended >= limit_end - 2:
        return "the job is ending at its Slurm time limit (TIMEOUT)"
    if exit_info is not None and not signalled(exit_info):
        return "the job is ending because its Triton ended"
    return f"the job is ending without BioEngine stopping it: {OUTSIDE}"


def ended_message(job: Job, exit_info: dict[str, Any] | None) -> str:
    """Why the job of a replica that BioEngine did not stop ended: its state in words, the exit
    code, Slurm's reason (with a hint) and the launcher's own words (`exit_info`)."""
    if job.state == "COMPLETING":
        why = why_completing(job, exit_info)
    else:
        why = translate(job.state).message
    parts = [f"Slurm job {job.job_id} {job.state}: {why}"]
    if job.exit_code not in (None, 0):
        parts.append(f"exit code {job.exit_code}")
    if job.reason and job.reason not in ("None", "NonZeroExitCode"):
        hint = REASON_HINTS.get(job.reason, "")
        parts.append(f"Slurm reason {job.reason}" + (f" ({hint})" if hint else ""))
    if exit_info is not None and exit_info.get("reason"):
        parts.append(f"launcher: {exit_info['reason']}")
    return "; ".join(parts)
