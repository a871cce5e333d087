"""The translation of Slurm job states and reasons into replica states and messages (no cluster)."""

from __future__ import annotations

import pytest
from bioengine_executor_slurm.slurm import Job
from bioengine_executor_slurm.states import (
    ALIVE_STATES,
    TRANSLATE_TABLE,
    ended_message,
    pending_message,
    translate,
    why_completing,
)

from bioengine_core.contracts import ReplicaState


def test_alive_states_are_the_ones_a_job_may_still_run_in() -> None:
    """Every state in which a job may still run maps to PENDING (RUNNING: STARTING until ready);
    every other known state is an end, which FAILS a replica that BioEngine did not stop."""
    assert ALIVE_STATES == {
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "SUSPENDED",
        "REQUEUED",
        "REQUEUE_FED",
        "REQUEUE_HOLD",
        "RESIZING",
        "SIGNALING",
        "STAGE_OUT",
        "RESV_DEL_HOLD",
    }
    assert translate("RUNNING").state is ReplicaState.STARTING
    assert translate("SUSPENDED") == (ReplicaState.PENDING, "Slurm state SUSPENDED")
    ended = set(TRANSLATE_TABLE) - ALIVE_STATES
    assert {translate(s).state for s in ended} == {ReplicaState.FAILED}
    assert Job("1", "n", "COMPLETING").alive is False and Job("1", "n", "RUNNING").alive


def test_unknown_state_reads_as_ended() -> None:
    assert translate("NEW_STATE") == (
        ReplicaState.FAILED,
        "the job ended in Slurm state NEW_STATE",
    )


def test_pending_reasons_say_whether_waiting_helps() -> None:
    message, can_wait = pending_message("Resources")
    assert (
        can_wait and message == "pending in Slurm (reason: Resources): waiting for free resources"
    )
    message, can_wait = pending_message("PartitionConfig")
    assert not can_wait and message.endswith(
        "; it will not start unless the request or the cluster changes"
    )
    assert pending_message("")[0] == "pending in Slurm (reason: None): waiting"


def test_ended_message_has_state_exit_code_reason_and_launcher_words() -> None:
    job = Job("42", "bioengine-lab", "OUT_OF_MEMORY", reason="OutOfMemory", exit_code=137)
    message = ended_message(job, {"reason": "tritonserver exited unexpectedly with code 137"})
    assert message == (
        "Slurm job 42 OUT_OF_MEMORY: the job ran out of memory; exit code 137; "
        "Slurm reason OutOfMemory (the job exceeded its memory (raise [executor] memory)); "
        "launcher: tritonserver exited unexpectedly with code 137"
    )
    timeout = Job("7", "n", "COMPLETING", start_time=100.0, end_time=700.0, time_limit_s=600.0)
    assert "at its Slurm time limit (TIMEOUT)" in ended_message(timeout, None)


@pytest.mark.parametrize("reason", ["ReqNodeNotAvail", "PartitionDown", "NodeDown"])
def test_maintenance_and_outages_are_waited_for_not_given_up(reason):
    """A drained node or a partition down for maintenance ends: serve waits (ready_timeout)."""
    from bioengine_executor_slurm.states import pending_message

    message, can_wait = pending_message(reason)
    assert can_wait is True and "will not start" not in message
    assert "starts when" in message


def test_a_request_that_never_fits_is_given_up():
    from bioengine_executor_slurm.states import pending_message

    message, can_wait = pending_message("PartitionConfig")
    assert can_wait is False and "will not start" in message


def test_a_job_slurm_still_shows_running_after_an_outside_scancel_is_explained() -> None:
    """scancel makes the launcher record the signal before squeue leaves RUNNING: the replica's
    message must say it was cancelled outside BioEngine, not blame the time limit (a running
    job's end_time is its planned end) or Triton."""
    import time

    now = time.time()
    job = Job("7", "x.1", "RUNNING", start_time=now - 60, end_time=now + 3540, time_limit_s=3600)
    signalled = {"reason": "stopped by SIGTERM (job cancelled, or its time limit reached)"}
    assert "cancelled outside BioEngine" in why_completing(job, signalled)
    assert "Triton ended" in why_completing(job, {"reason": "tritonserver exited with code 1"})
    at_limit = Job("8", "x.1", "RUNNING", start_time=now - 3600, time_limit_s=3600)
    assert "time limit" in why_completing(at_limit, signalled)
