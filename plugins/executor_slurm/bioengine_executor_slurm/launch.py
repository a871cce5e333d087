"""Run inside a batch job: start Triton on free ports, wait until ready, publish the endpoint.

`python -m bioengine_executor_slurm.launch --endpoint-dir DIR --repository URI [...]`

Writes `DIR/<job id>.json` atomically once `/v2/health/ready` answers (host, ports, url), removes
it when Triton exits and then writes `DIR/<job id>.exit.json` (exit code and why). SIGTERM and
SIGINT (scancel, the time limit) are forwarded to tritonserver; the launcher exits with
tritonserver's exit code, so a crash shows as a FAILED job. Triton (or its container runtime)
gets an allow-listed environment plus the variables named by `--pass-env`, nothing else of the job.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from bioengine_core.childenv import child_env
from bioengine_core.errors import ExecutorError
from bioengine_core.triton import TritonInstall, find_triton, is_ready, triton_args
from bioengine_core.util import (
    connect_host,
    free_ports,
    parse_port_range,
    url_host,
    write_json,
)

from .jobenv import RUNTIME_ALLOW, TRITON_ALLOW, matching


def log(message: str) -> None:
    """A line in the job's output file, marked as the launcher's."""
    print(f"[bioengine-launch {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------------- the command


def build_command(args: argparse.Namespace, ports: list[int]) -> tuple[list[str], dict[str, str]]:
    """tritonserver's command line (directly or through a container runtime) and environment.

    The environment is `child_env`'s allow-list plus the `--pass-env` variables of the job: the
    rest of the job's environment (whatever sbatch, a prolog or a login shell put there) stays out.
    """
    passed = matching(os.environ, args.pass_env)
    if args.container == "none":
        install = find_triton(args.triton_binary)
        env = child_env({**install.env, **passed}, allow=TRITON_ALLOW)
    else:
        install = TritonInstall(binary=Path(args.container_triton))
        env = runtime_env(passed if args.container in ("podman", "docker") else {})
    cmd = triton_command(args, install, ports)
    if args.container in ("apptainer", "singularity"):
        env.update(apptainer_env(passed))
        cmd = apptainer_prefix(args) + list(args.container_option) + [args.image] + cmd
    elif args.container in ("podman", "docker"):
        cmd = run_prefix(args, passed) + list(args.container_option) + [args.image] + cmd
    return cmd, env


def triton_command(args: argparse.Namespace, install: TritonInstall, ports: list[int]) -> list[str]:
    """tritonserver's own arguments: the repository, the three ports, models, extra options."""
    http, grpc, metrics = ports
    extra = list(args.triton_arg)
    if args.exit_timeout is not None:
        extra.insert(0, f"--exit-timeout-secs={args.exit_timeout}")
    cmd = triton_args(
        install,
        args.repository,
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
        address=args.bind_address,
        models=args.model,
        extra=extra,
    )
    cmd[0] = str(install.binary) if args.container == "none" else args.container_triton
    return cmd


def apptainer_prefix(args: argparse.Namespace) -> list[str]:
    """`apptainer exec --cleanenv` (or singularity) with GPUs and the read-only binds."""
    prefix = [args.container, "exec", "--cleanenv"]
    if args.gpus:
        prefix.append("--nv")
    for path in args.bind:
        prefix += ["--bind", f"{path}:{path}:ro"]
    return prefix


def apptainer_env(passed: dict[str, str]) -> dict[str, str]:
    """The passed variables as APPTAINERENV_/SINGULARITYENV_ (the only ones `--cleanenv` lets
    into the container)."""
    env = {}
    for name, value in sorted(passed.items()):
        env[f"APPTAINERENV_{name}"] = value
        env[f"SINGULARITYENV_{name}"] = value
    return env


def run_prefix(args: argparse.Namespace, passed: dict[str, str]) -> list[str]:
    """`podman run`/`docker run` on the host network, with GPUs, read-only volumes and the
    passed variables by name (their values come from the client's environment)."""
    prefix = [args.container, "run", "--rm", "--network=host", f"--name={container_name(args)}"]
    if args.container == "podman":
        prefix.append("--http-proxy=false")  # podman copies the client's proxy variables in
    if args.gpus:
        prefix.append("--gpus=all" if args.container == "docker" else "--device=nvidia.com/gpu=all")
    for path in args.bind:
        prefix += ["--volume", f"{path}:{path}:ro"]
    for name in sorted(passed):
        prefix += ["--env", name]
    return prefix


def runtime_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The container runtime client's environment: its own settings plus `extra`."""
    return child_env(extra, allow=RUNTIME_ALLOW)


# ---------------------------------------------------------------------- clean-up


def container_name(args: argparse.Namespace) -> str:
    """The docker/podman container name of this job's Triton."""
    return f"bioengine-{args.job_id or os.getpid()}"


def stop_container(args: argparse.Namespace) -> None:
    """Stop the job's docker/podman container (SIGTERM, then SIGKILL after the exit timeout)."""
    grace = (args.exit_timeout if args.exit_timeout is not None else 3) + 2
    try:
        subprocess.run(
            [args.container, "stop", f"--time={grace}", container_name(args)],
            env=runtime_env(),
            capture_output=True,
            timeout=grace + 30,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"could not stop container {container_name(args)}: {exc}")


def remove_container(args: argparse.Namespace) -> None:
    """Remove the job's docker/podman container: it must not outlive the job (best effort)."""
    if args.container not in ("podman", "docker"):
        return
    try:
        subprocess.run(
            [args.container, "rm", "--force", container_name(args)],
            env=runtime_env(),
            capture_output=True,
            timeout=60,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        log(f"could not remove container {container_name(args)}: {exc}")


def kill_group(pgid: int) -> None:
    """SIGKILL what is left of a process group (after its leader, tritonserver, ended)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def advertised_host(args: argparse.Namespace) -> str:
    """The name the engine uses to reach this node."""
    if args.advertise_host:
        return args.advertise_host
    if connect_host(args.bind_address) == args.bind_address:  # a specific address
        return args.bind_address
    return socket.gethostname()  # a wildcard: the node's name


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The launcher's command-line options (rendered into the batch script)."""
    p = argparse.ArgumentParser(
        prog="python -m bioengine_executor_slurm.launch", description=__doc__.splitlines()[0]
    )
    p.add_argument("--endpoint-dir", required=True, type=Path)
    p.add_argument("--repository", required=True)
    p.add_argument("--model", action="append", default=[])
    p.add_argument("--bind-address", default="0.0.0.0")
    p.add_argument("--port-range", help="Triton's ports from this range (e.g. 9100-9199).")
    p.add_argument("--advertise-host")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--exit-timeout", type=int, default=None)
    p.add_argument("--triton-binary")
    p.add_argument(
        "--container",
        default="none",
        choices=["none", "apptainer", "singularity", "podman", "docker"],
    )
    p.add_argument("--image")
    p.add_argument("--container-triton", default="tritonserver")
    p.add_argument("--container-option", action="append", default=[])
    p.add_argument("--bind", action="append", default=[])
    p.add_argument("--pass-env", action="append", default=[])
    p.add_argument("--gpus", type=int, default=0)
    p.add_argument("--triton-arg", action="append", default=[])
    p.add_argument("--job-id", default=os.environ.get("SLURM_JOB_ID", ""))
    return p.parse_args(argv)


class Launcher:
    """One run of the launcher: Triton's process, the signal that stops it, the files it writes."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.job_id = args.job_id or f"pid{os.getpid()}"
        args.endpoint_dir.mkdir(parents=True, exist_ok=True)
        self.endpoint = args.endpoint_dir / f"{self.job_id}.json"
        self.exit_file = args.endpoint_dir / f"{self.job_id}.exit.json"
        self.proc: subprocess.Popen | None = None
        self.stop_signal: int | None = None
        """The signal (scancel, time limit) that asked Triton to stop; None while unasked."""

    def run(self) -> int:
        """Start Triton, publish its endpoint when ready, wait for it, report how it ended."""
        try:
            within = parse_port_range(self.args.port_range) if self.args.port_range else None
            ports = free_ports(self.args.bind_address, 3, within=within)
            cmd, env = build_command(self.args, ports)
        except (ExecutorError, OSError) as exc:
            return self.finish(2, f"cannot start tritonserver: {exc}")
        self.start(cmd, env)
        ended = self.wait_ready(ports[0])
        if ended is not None:
            return self.finish(*ended)
        self.publish(ports)
        return self.finish(*self.wait_exit())

    def start(self, cmd: list[str], env: dict[str, str]) -> None:
        """Start tritonserver and forward SIGTERM and SIGINT to it from now on.

        Triton gets its own process group: when it ends, whatever it left behind (python backend
        stubs orphaned by a crash) is killed with the group, even where Slurm tracks processes
        only by ancestry (proctrack/linuxproc) and would miss them.
        """
        log(f"job {self.job_id} on {socket.gethostname()}: {' '.join(cmd)}")
        self.proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        signal.signal(signal.SIGTERM, self.forward)
        signal.signal(signal.SIGINT, self.forward)

    def forward(self, signum: int, _frame: object) -> None:
        """Signal handler: ask tritonserver to stop (and its container, through the runtime)."""
        first = self.stop_signal is None
        self.stop_signal = signum
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if first and self.args.container in ("podman", "docker"):
                # The runtime's own signal proxy may be killed by the same scancel: stop the
                # container through the runtime, or it would outlive the job.
                threading.Thread(target=stop_container, args=(self.args,), daemon=True).start()

    def wait_ready(self, http_port: int) -> tuple[int, str] | None:
        """Poll `/v2/health/ready` until it answers (None), or return the exit code and reason
        when Triton exits, is stopped, or is not ready within `--ready-timeout`."""
        assert self.proc is not None
        url = f"http://{url_host(connect_host(self.args.bind_address))}:{http_port}"
        deadline = time.monotonic() + self.args.ready_timeout
        while self.proc.poll() is None and self.stop_signal is None:
            if is_ready(url, timeout=1.0):
                return None
            if time.monotonic() > deadline:
                self.terminate()
                return 3, f"tritonserver was not ready after {self.args.ready_timeout:g} s"
            time.sleep(0.3)
        code = self.proc.wait()
        if self.stop_signal is not None:
            return 0, f"stopped by signal {self.stop_signal} before ready"
        return code or 1, f"tritonserver exited with code {code} before it was ready"

    def terminate(self) -> None:
        """SIGTERM tritonserver, SIGKILL it after 15 s."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def publish(self, ports: list[int]) -> None:
        """Write the endpoint file the executor reads (atomically), once Triton is ready."""
        assert self.proc is not None
        host = advertised_host(self.args)
        url = f"http://{url_host(host)}:{ports[0]}"
        write_json(
            self.endpoint,
            {
                "job_id": self.job_id,
                "host": host,
                "node": socket.gethostname(),
                "http_port": ports[0],
                "grpc_port": ports[1],
                "metrics_port": ports[2],
                "url": url,
                "pid": self.proc.pid,
                "ready_at": time.time(),
            },
        )
        log(f"ready: {url} (grpc {ports[1]}, metrics {ports[2]})")

    def wait_exit(self) -> tuple[int, str]:
        """Wait for tritonserver to end; its exit code and why (0 when it was asked to stop)."""
        assert self.proc is not None
        while True:
            try:
                code = self.proc.wait()
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for safety
                continue
        if self.stop_signal is not None:
            name = signal.Signals(self.stop_signal).name
            how = f"exit code {code}" if code >= 0 else f"ended by {signal.Signals(-code).name}"
            return 0, (
                f"stopped by {name} (job cancelled, or its time limit reached); tritonserver "
                f"{how}; job exit code 0"
            )
        if code < 0:
            return 128 - code, f"tritonserver crashed: killed by {signal.Signals(-code).name}"
        return code or 1, f"tritonserver exited unexpectedly with code {code}"

    def finish(self, code: int, reason: str) -> int:
        """Remove the endpoint, clean up Triton's leftovers, write the exit file; return `code`."""
        self.endpoint.unlink(missing_ok=True)
        if self.proc is not None:
            kill_group(self.proc.pid)
        remove_container(self.args)
        write_json(
            self.exit_file,
            {
                "job_id": self.job_id,
                "exit_code": code,
                "reason": reason,
                # the signal the job received (scancel, time limit, preemption), if any
                "stopped_by": signal.Signals(self.stop_signal).name if self.stop_signal else None,
                "ended_at": time.time(),
            },
        )
        log(reason)
        return code


def main(argv: list[str] | None = None) -> int:
    """Start Triton, publish its endpoint when ready, wait for it, report how it ended."""
    return Launcher(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
