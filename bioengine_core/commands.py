"""The helpers through which every external command runs: `run_command` for commands that end
(failures carry command, exit code and stderr), `start_process` for long-lived servers."""

from __future__ import annotations

import logging
import shlex
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

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


def start_process(
    argv: Sequence[str],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    allow_env: Iterable[str] = (),
    cwd: Path | None = None,
    new_session: bool = True,
) -> subprocess.Popen:
    """Start a long-lived process (a server) that writes to `log_path`, and return at once.

    Its environment is `child_env(env, allow=allow_env)`: the allow-list plus what it needs.
    `new_session` puts it in a session of its own, so it outlives the engine (a replica that a
    restarted `serve` adopts) and `os.killpg(pid, ...)` reaches its children. ExecutorError
    when it cannot be started; its command line is the log's first line.
    """
    from .errors import ExecutorError

    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        log_file.write(f"# bioengine: {shlex.join(argv)}\n".encode())
        log_file.flush()
        try:
            return subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=child_env(env, allow=allow_env),
                cwd=cwd,
                start_new_session=new_session,
            )
        except OSError as exc:
            raise ExecutorError(f"cannot start {argv[0]}: {exc}") from exc
