"""The one helper through which every external command runs, so failures carry command, code and stderr."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence

import sh

from .childenv import child_env
from .errors import CommandError

log = logging.getLogger(__name__)


def run_command(
    cmd: Sequence[str],
    *,
    input: str | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = 60,
    retries: int = 0,
    retry_delay: float = 1.0,
    retry_if: tuple[str, ...] = (),
    allow_env: Iterable[str] = (),
) -> str:
    """Run `cmd` and return its stdout; raise CommandError with command, exit code and stderr.

    `retries` re-runs the command when its stderr contains one of `retry_if` (transient errors
    such as a scheduler's "Socket timed out"), waiting `retry_delay` seconds between tries.
    The command gets `env` if given, else the allow-listed environment of `child_env` plus the
    variables (names or patterns) in `allow_env`: the engine's secrets never reach it.
    """
    if not cmd:
        raise ValueError("empty command")
    attempt = 0
    while True:
        try:
            program = sh.Command(cmd[0])
        except sh.CommandNotFound as exc:
            raise CommandError(list(cmd), None, stderr=f"{cmd[0]}: command not found") from exc
        kwargs: dict = {"_timeout": timeout}
        if input is not None:
            kwargs["_in"] = input
        kwargs["_env"] = dict(env) if env is not None else child_env(allow=allow_env)
        try:
            out = program(*cmd[1:], **kwargs)
            return str(out)
        except sh.ErrorReturnCode as exc:
            stderr = exc.stderr.decode(errors="replace")
            stdout = exc.stdout.decode(errors="replace")
            error = CommandError(list(cmd), exc.exit_code, stdout, stderr)
        except sh.TimeoutException as exc:
            error = CommandError(list(cmd), None, stderr=f"timed out after {timeout} s")
            error.__cause__ = exc
        attempt += 1
        transient = any(marker in error.stderr for marker in retry_if)
        if attempt > retries or not transient:
            raise error
        log.warning("transient failure, retrying (%d/%d): %s", attempt, retries, error)
        time.sleep(retry_delay)
