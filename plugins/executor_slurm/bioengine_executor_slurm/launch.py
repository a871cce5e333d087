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
import json
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

from .jobenv import RUNTIME_ALLOW, TRITON_ALLOW, matching


def log(message: str) -> None:
    """A line in the job's output file, marked as the launcher's."""
    print(f"[bioengine-launch {time.strftime('%H:%M:%S')}] {message}", flush=True)


def free_ports(address: str, count: int) -> list[int]:
    """`count` distinct ports that are free on `address` right now."""
    sockets, ports = [], []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((address, 0))
            sockets.append(sock)
            ports.append(sock.getsockname()[1])
    finally:
        for sock in sockets:
            sock.close()
    return ports


def write_json(path: Path, data: dict) -> None:
    """Write `data` to `path` atomically (temp file, fsync, rename), so readers never see half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def build_command(args: argparse.Namespace, ports: list[int]) -> tuple[list[str], dict[str, str]]:
    """tritonserver's command line (directly or through a container runtime) and environment.

    The environment is `child_env`'s allow-list plus the `--pass-env` variables of the job: the
    rest of the job's environment (whatever sbatch, a prolog or a login shell put there) stays out.
    """
    http, grpc, metrics = ports
    passed = matching(os.environ, args.pass_env)
    if args.container == "none":
        install = find_triton(args.triton_binary)
        env = child_env({**install.env, **passed}, allow=TRITON_ALLOW)
    else:
        install = TritonInstall(binary=Path(args.container_triton))
        env = runtime_env(passed if args.container in ("podman", "docker") else {})
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
    if args.container in ("apptainer", "singularity"):
        prefix = [args.container, "exec", "--cleanenv"]
        if args.gpus:
            prefix.append("--nv")
        for path in args.bind:
            prefix += ["--bind", f"{path}:{path}:ro"]
        for name, value in sorted(passed.items()):
            env[f"APPTAINERENV_{name}"] = value
            env[f"SINGULARITYENV_{name}"] = value
        cmd = prefix + list(args.container_option) + [args.image] + cmd
    elif args.container in ("podman", "docker"):
        prefix = [args.container, "run", "--rm", "--network=host", f"--name={container_name(args)}"]
        if args.container == "podman":
            prefix.append("--http-proxy=false")  # podman copies the client's proxy variables in
        if args.gpus:
            prefix.append(
                "--gpus=all" if args.container == "docker" else "--device=nvidia.com/gpu=all"
            )
        for path in args.bind:
            prefix += ["--volume", f"{path}:{path}:ro"]
        for name in sorted(passed):
            prefix += ["--env", name]  # the value comes from the client's environment
        cmd = prefix + list(args.container_option) + [args.image] + cmd
    return cmd, env


def runtime_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The container runtime client's environment: its own settings plus `extra`."""
    return child_env(extra, allow=RUNTIME_ALLOW)


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
    if args.bind_address not in ("0.0.0.0", "::", ""):
        return args.bind_address
    return socket.gethostname()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The launcher's command-line options (rendered into the batch script)."""
    p = argparse.ArgumentParser(
        prog="python -m bioengine_executor_slurm.launch", description=__doc__.splitlines()[0]
    )
    p.add_argument("--endpoint-dir", required=True, type=Path)
    p.add_argument("--repository", required=True)
    p.add_argument("--model", action="append", default=[])
    p.add_argument("--bind-address", default="0.0.0.0")
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


def main(argv: list[str] | None = None) -> int:
    """Start Triton, publish its endpoint when ready, wait for it, report how it ended."""
    args = parse_args(argv)
    job_id = args.job_id or f"pid{os.getpid()}"
    args.endpoint_dir.mkdir(parents=True, exist_ok=True)
    endpoint = args.endpoint_dir / f"{job_id}.json"
    exit_file = args.endpoint_dir / f"{job_id}.exit.json"
    host = advertised_host(args)
    check_host = "127.0.0.1" if args.bind_address in ("0.0.0.0", "") else args.bind_address

    proc: subprocess.Popen | None = None

    def finish(code: int, reason: str) -> int:
        endpoint.unlink(missing_ok=True)
        if proc is not None:
            kill_group(proc.pid)
        remove_container(args)
        write_json(
            exit_file,
            {"job_id": job_id, "exit_code": code, "reason": reason, "ended_at": time.time()},
        )
        log(reason)
        return code

    try:
        ports = free_ports(args.bind_address or "0.0.0.0", 3)
        cmd, env = build_command(args, ports)
    except (ExecutorError, OSError) as exc:
        return finish(2, f"cannot start tritonserver: {exc}")
    log(f"job {job_id} on {socket.gethostname()}: {' '.join(cmd)}")
    # Triton gets its own process group: when it ends, whatever it left behind (python backend
    # stubs orphaned by a crash) is killed with the group, even where Slurm tracks processes only
    # by ancestry (proctrack/linuxproc) and would miss them.
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    stopping = {"signal": None}

    def forward(signum: int, _frame: object) -> None:
        first = stopping["signal"] is None
        stopping["signal"] = signum
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            if first and args.container in ("podman", "docker"):
                # The runtime's own signal proxy may be killed by the same scancel: stop the
                # container through the runtime, or it would outlive the job.
                threading.Thread(target=stop_container, args=(args,), daemon=True).start()

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)

    url_local = f"http://{check_host}:{ports[0]}"
    deadline = time.monotonic() + args.ready_timeout
    while proc.poll() is None and stopping["signal"] is None:
        if is_ready(url_local, timeout=1.0):
            break
        if time.monotonic() > deadline:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
            return finish(3, f"tritonserver was not ready after {args.ready_timeout:g} s")
        time.sleep(0.3)
    else:
        code = proc.wait()
        if stopping["signal"] is not None:
            return finish(0, f"stopped by signal {stopping['signal']} before ready")
        return finish(code or 1, f"tritonserver exited with code {code} before it was ready")

    write_json(
        endpoint,
        {
            "job_id": job_id,
            "host": host,
            "node": socket.gethostname(),
            "http_port": ports[0],
            "grpc_port": ports[1],
            "metrics_port": ports[2],
            "url": f"http://{host}:{ports[0]}",
            "pid": proc.pid,
            "ready_at": time.time(),
        },
    )
    log(f"ready: http://{host}:{ports[0]} (grpc {ports[1]}, metrics {ports[2]})")
    while True:
        try:
            code = proc.wait()
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries, kept for safety
            continue
    if stopping["signal"] is not None:
        return finish(0, f"tritonserver stopped (signal {stopping['signal']}), exit code {code}")
    return finish(code or 1, f"tritonserver exited unexpectedly with code {code}")


if __name__ == "__main__":
    sys.exit(main())
