"""Container mode: replicas as docker/podman containers (or apptainer/singularity processes).

Docker and podman containers are found again through their labels
(`--label bioengine.deployment=NAME`), so a restarted engine adopts them with
`ps --filter label=...`; the replica's url is stored in a label as well. Every engine command goes
through `bioengine_core.commands.run_command`. The model repository directory is bind-mounted
read-only at `/models`; Triton's three ports are published on free host ports of `address`.
"""

from __future__ import annotations

import json
import math
import shlex
import threading
import time
from pathlib import Path
from typing import Any

from bioengine_core.childenv import child_env
from bioengine_core.commands import run_command
from bioengine_core.contracts import (
    BackendContext,
    Executor,
    ReplicaSpec,
    ReplicaState,
    ReplicaStatus,
)
from bioengine_core.errors import CommandError, ExecutorError
from bioengine_core.triton import TritonInstall, is_ready, triton_args
from bioengine_core.util import DEPLOYMENT_LABEL, REPLICA_LABEL, connect_host

from .common import (
    CONTAINER_CLIENT_ALLOW,
    URL_LABEL,
    is_secret_name,
    new_replica_id,
    replica_labels,
    replica_ports,
    tail_file,
)
from .settings import LocalExecutorSettings

CONTAINER_PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
"""Triton's ports inside a docker/podman container (published on free host ports)."""
CONTAINER_REPOSITORY = "/models"
"""Where the model repository directory is bind-mounted inside the container."""


def container_name(replica_id: str) -> str:
    """The docker/podman container name of a replica."""
    return f"bioengine-{replica_id}"


def gpu_flags(engine: str, gpus: str | None, count: int) -> list[str]:
    """The engine's GPU options for `gpus` (`all`, `0,1` or None) or else `count` GPUs."""
    if gpus is None and count <= 0:
        return []
    if engine == "docker":
        if gpus == "all":
            return ["--gpus", "all"]
        return ["--gpus", f'"device={gpus}"' if gpus else str(count)]
    if engine == "podman":  # Container Device Interface names from nvidia-ctk cdi generate
        devices = ["all"] if gpus == "all" else gpus.split(",") if gpus else map(str, range(count))
        return [flag for d in devices for flag in ("--device", f"nvidia.com/gpu={d}")]
    return ["--nv"]  # apptainer / singularity


def _repository(spec: ReplicaSpec) -> tuple[str, Path | None]:
    """(what Triton gets as --model-repository, host directory to bind-mount or None)."""
    local = spec.repository.local_path
    return (CONTAINER_REPOSITORY, Path(local)) if local is not None else (spec.repository.uri, None)


def _replica_env(settings: LocalExecutorSettings, spec: ReplicaSpec) -> dict[str, str]:
    return {**settings.env, **spec.repository.env, **spec.env}


def _triton_argv(
    settings: LocalExecutorSettings,
    spec: ReplicaSpec,
    repository: str,
    ports: dict[str, int],
    address: str,
) -> list[str]:
    install = TritonInstall(binary=Path(settings.container_triton))
    return triton_args(
        install,
        repository,
        http_port=ports["http"],
        grpc_port=ports["grpc"],
        metrics_port=ports["metrics"],
        address=address,
        models=spec.models,
        extra=settings.server_args(),
    )


def container_run_command(
    settings: LocalExecutorSettings, spec: ReplicaSpec, replica_id: str, ports: dict[str, int]
) -> tuple[list[str], dict[str, str]]:
    """`docker run`/`podman run` for one replica, and the secret variables to run it with.

    Plain variables (settings and spec) are passed as `--env NAME=VALUE`. The repository's
    variables (storage credentials) and secret-looking names are passed as `--env NAME`, which
    makes the client copy them from its own environment: their values stay out of `ps` and
    previews. The returned dict holds those; run the client with `client_env(those)`. The
    container gets no other variable of the client (podman: `--http-proxy=false`).
    """
    engine = settings.container_engine
    if engine not in ("docker", "podman"):
        raise ExecutorError(f"{engine} containers are run with apptainer_command")
    repository, mount = _repository(spec)
    url = f"http://{connect_host(settings.address)}:{ports['http']}"
    labels = {**replica_labels(spec.deployment, replica_id, spec.labels), URL_LABEL: url}
    argv = [engine, "run", "--detach", "--name", container_name(replica_id)]
    for key in sorted(labels):
        argv += ["--label", f"{key}={labels[key]}"]
    for port in ("http", "grpc", "metrics"):
        argv += ["--publish", f"{settings.address}:{ports[port]}:{CONTAINER_PORTS[port]}"]
    if mount is not None:
        argv += ["--volume", f"{mount}:{CONTAINER_REPOSITORY}:ro"]
    env = _replica_env(settings, spec)
    secret = {k: v for k, v in env.items() if k in spec.repository.env or is_secret_name(k)}
    for key in sorted(env):
        argv += ["--env", key if key in secret else f"{key}={env[key]}"]
    if engine == "podman":  # podman copies the client's proxy variables in by default
        argv.append("--http-proxy=false")
    argv += gpu_flags(engine, settings.gpus, spec.gpus)
    argv += list(settings.container_options)
    argv.append(settings.image)
    argv += _triton_argv(settings, spec, repository, CONTAINER_PORTS, "0.0.0.0")
    return argv, secret


def client_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The docker/podman client's environment: what the runtime needs, plus `extra`.

    The engine's own secrets (API tokens, other S3 keys) never reach the client, so `--env NAME`
    cannot copy them into a container either.
    """
    return child_env(extra, allow=CONTAINER_CLIENT_ALLOW)


def apptainer_command(
    settings: LocalExecutorSettings, spec: ReplicaSpec, ports: dict[str, int]
) -> tuple[list[str], dict[str, str]]:
    """`apptainer exec`/`singularity exec` for one replica, and its environment additions.

    The container shares the host network, so Triton binds the free host ports directly; the
    replica's variables travel as APPTAINERENV_NAME (SINGULARITYENV_NAME), not on the command line.
    """
    engine = settings.container_engine
    if engine not in ("apptainer", "singularity"):
        raise ExecutorError(f"{engine} containers are run with container_run_command")
    repository, mount = _repository(spec)
    argv = [engine, "exec", "--cleanenv"]
    argv += gpu_flags(engine, settings.gpus, spec.gpus)
    if mount is not None:
        argv += ["--bind", f"{mount}:{CONTAINER_REPOSITORY}:ro"]
    argv += list(settings.container_options)
    argv.append(settings.image)
    argv += _triton_argv(settings, spec, repository, ports, settings.address)
    prefix = "APPTAINERENV_" if engine == "apptainer" else "SINGULARITYENV_"
    inner = _replica_env(settings, spec)
    if settings.gpus and settings.gpus != "all":
        inner["CUDA_VISIBLE_DEVICES"] = settings.gpus
    return argv, {f"{prefix}{key}": value for key, value in inner.items()}


class ContainerExecutor(Executor):
    """Runs each replica as a docker or podman container (mode = "container")."""

    def __init__(self, settings: LocalExecutorSettings, context: BackendContext):
        if settings.container_engine not in ("docker", "podman"):
            raise ExecutorError("ContainerExecutor runs docker or podman; use ApptainerExecutor")
        self.settings = settings
        self.context = context
        self.engine = settings.container_engine
        base = Path(context.state_dir) / "local"
        self.log_dir = context.resolve_path(settings.log_dir) if settings.log_dir else base / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._launching: dict[str, dict[str, Any]] = {}
        self._failed: dict[str, ReplicaStatus] = {}
        self._lock = threading.RLock()

    def triton_backends(self) -> list[str]:
        """What the configured image provides (setting `container_backends`)."""
        return list(self.settings.container_backends)

    def _run(self, *args: str, timeout: float | None = 60) -> str:
        return run_command([self.engine, *args], env=client_env(), timeout=timeout)

    def log_path(self, replica_id: str) -> Path:
        """Where the command line, and the container's output after it stopped, are kept."""
        return self.log_dir / f"{replica_id}.log"

    def preview(self, spec: ReplicaSpec) -> str:
        """The `run` command start(spec) executes; host ports are chosen free at start."""
        argv, _ = container_run_command(
            self.settings, spec, "REPLICA_ID", {"http": 8000, "grpc": 8001, "metrics": 8002}
        )
        return "# host ports 8000-8002 stand for the free ports chosen at start\n" + shlex.join(
            argv
        )

    # ------------------------------------------------------------------ start

    def start(self, spec: ReplicaSpec) -> ReplicaStatus:
        """Run the container from a background thread (an image pull may take minutes)."""
        replica_id = new_replica_id(spec.deployment)
        with self._lock:  # not yet published by a container that is still being created
            pending = [p for r in self._launching.values() for p in r["ports"].values()]
        http, grpc, metrics = replica_ports(self.settings, pending)
        ports = {"http": http, "grpc": grpc, "metrics": metrics}
        argv, env = container_run_command(self.settings, spec, replica_id, ports)
        self.log_path(replica_id).write_text(f"# bioengine: {shlex.join(argv)}\n")
        url = f"http://{connect_host(self.settings.address)}:{http}"
        labels = {**replica_labels(spec.deployment, replica_id, spec.labels), URL_LABEL: url}
        record: dict[str, Any] = {
            "url": url,
            "labels": labels,
            "ports": ports,
            "started_at": time.time(),
        }
        thread = threading.Thread(
            target=self._launch, args=(replica_id, argv, env, record), daemon=True
        )
        record["thread"] = thread
        with self._lock:
            self._launching[replica_id] = record
        thread.start()
        self.context.logger.info("starting container %s at %s", container_name(replica_id), url)
        return self._status(replica_id, ReplicaState.PENDING, url, labels, record["started_at"])

    def _launch(self, replica_id: str, argv: list[str], env: dict[str, str], record: dict) -> None:
        try:
            run_command(argv, env=client_env(env), timeout=self.settings.start_timeout)
        except CommandError as exc:
            record["error"] = str(exc)
            # a half-created container (run failed after create) must not linger
            try:
                self._run("rm", "--force", container_name(replica_id))
            except CommandError:
                pass

    def _status(
        self,
        replica_id: str,
        state: ReplicaState,
        url: str | None,
        labels: dict[str, str],
        started_at: float | None,
        message: str = "",
        **details: Any,
    ) -> ReplicaStatus:
        return ReplicaStatus(
            replica_id=replica_id,
            state=state,
            url=url,
            host=connect_host(self.settings.address),
            labels=dict(labels),
            started_at=started_at,
            message=message,
            details={"container": container_name(replica_id), "engine": self.engine, **details},
        )

    # ------------------------------------------------------------------ inspect

    def _inspect(self, names: list[str]) -> list[dict[str, Any]]:
        """`inspect` output for existing containers among `names` (missing ones are skipped)."""
        if not names:
            return []
        try:
            out = self._run("inspect", "--type", "container", *names)
        except CommandError as exc:
            if "no such" not in (exc.stderr + exc.stdout).lower():
                raise
            if len(names) == 1:
                return []
            return [i for n in names for i in self._inspect([n])]
        data = json.loads(out or "[]")
        return data if isinstance(data, list) else []

    def _from_inspect(self, info: dict[str, Any]) -> ReplicaStatus | None:
        labels = (info.get("Config") or {}).get("Labels") or {}
        replica_id = labels.get(REPLICA_LABEL)
        if not replica_id:
            return None
        state = info.get("State") or {}
        url = labels.get(URL_LABEL)
        started = self._launching.get(replica_id, {}).get("started_at")
        cid = (info.get("Id") or "")[:12]
        if state.get("Running"):
            ready = bool(url) and is_ready(url, timeout=1.0)
            st = ReplicaState.READY if ready else ReplicaState.STARTING
            return self._status(replica_id, st, url, labels, started, container_id=cid)
        status = str(state.get("Status", "")).lower()
        if status in ("created", "configured", "initialized"):
            return self._status(replica_id, ReplicaState.PENDING, url, labels, started)
        code = state.get("ExitCode")
        message = f"container {status or 'ended'} (exit code {code})"
        tail = self.logs(replica_id, tail=15)
        return self._status(
            replica_id,
            ReplicaState.FAILED,
            url,
            labels,
            started,
            f"{message}\n{tail}".strip(),
            container_id=cid,
            exit_code=code,
        )

    def status(self, replica_id: str) -> ReplicaStatus:
        """From `inspect`: running -> READY/STARTING by probing, exited -> FAILED, gone -> STOPPED."""
        with self._lock:
            if replica_id in self._failed:
                return self._failed[replica_id]
            record = self._launching.get(replica_id)
        if record is not None:
            if record["thread"].is_alive():
                return self._status(
                    replica_id,
                    ReplicaState.PENDING,
                    record["url"],
                    record["labels"],
                    record["started_at"],
                    f"{self.engine} run in progress",
                )
            if "error" in record:
                failed = self._status(
                    replica_id,
                    ReplicaState.FAILED,
                    record["url"],
                    record["labels"],
                    record["started_at"],
                    record["error"],
                )
                with self._lock:
                    self._failed[replica_id] = failed
                    self._launching.pop(replica_id, None)
                return failed
        found = self._inspect([container_name(replica_id)])
        status = self._from_inspect(found[0]) if found else None
        if status is None:
            return ReplicaStatus(replica_id=replica_id, state=ReplicaState.STOPPED)
        if status.state is ReplicaState.STARTING and status.started_at is not None:
            if time.time() - status.started_at > self.settings.start_timeout:
                self.stop(replica_id)
                status.state = ReplicaState.FAILED
                status.message = f"not ready after {self.settings.start_timeout:.0f} s; stopped it"
                with self._lock:
                    self._failed[replica_id] = status
        return status

    # ------------------------------------------------------------------ stop, logs, list

    def stop(self, replica_id: str, *, grace: float | None = None) -> None:
        """`stop --time GRACE` (SIGTERM, then SIGKILL), keep its output, `rm`. Idempotent."""
        grace = self.settings.stop_grace if grace is None else grace
        with self._lock:
            self._failed.pop(replica_id, None)
            record = self._launching.pop(replica_id, None)
        if record is not None:
            record["thread"].join(self.settings.start_timeout)
        name = container_name(replica_id)
        if not self._inspect([name]):
            return
        try:
            self._run("stop", "--time", str(math.ceil(grace)), name, timeout=grace + 60)
        except CommandError as exc:
            if "no such" not in exc.stderr.lower():
                raise
        self._save_logs(replica_id)
        try:
            self._run("rm", "--force", name)
        except CommandError as exc:
            if "no such" not in exc.stderr.lower():
                raise
        self.context.logger.info("stopped container %s", name)

    def _container_logs(self, replica_id: str, tail: int | None = None) -> str:
        """stdout and stderr of the container, interleaved (run through `sh -c ... 2>&1`)."""
        args = [self.engine, "logs"]
        if tail is not None:
            args += ["--tail", str(tail)]
        script = f"exec {shlex.join([*args, container_name(replica_id)])} 2>&1"
        return run_command(["sh", "-c", script], env=client_env(), timeout=30)

    def _save_logs(self, replica_id: str) -> None:
        try:
            text = self._container_logs(replica_id)
        except CommandError:
            return
        with open(self.log_path(replica_id), "a") as fh:
            fh.write(text)

    def logs(self, replica_id: str, *, tail: int = 200) -> str:
        """The container's output; after it was removed, the copy kept at stop time."""
        if "/" in replica_id or replica_id.startswith("."):
            return ""
        try:
            return "\n".join(self._container_logs(replica_id, tail).splitlines()[-tail:])
        except CommandError:
            return tail_file(self.log_path(replica_id), tail)

    def list(self, deployment: str) -> list[ReplicaStatus]:
        """Running containers labelled with `deployment`, plus ones this instance is creating."""
        out = self._run(
            "ps", "--quiet", "--no-trunc", "--filter", f"label={DEPLOYMENT_LABEL}={deployment}"
        )
        ids = [line.strip() for line in out.splitlines() if line.strip()]
        found: dict[str, ReplicaStatus] = {}
        for info in self._inspect(ids):
            status = self._from_inspect(info)
            if status is not None and status.labels.get(DEPLOYMENT_LABEL) == deployment:
                if status.state.alive:
                    found[status.replica_id] = status
        with self._lock:
            launching = [
                rid
                for rid, r in self._launching.items()
                if r["labels"].get(DEPLOYMENT_LABEL) == deployment and rid not in found
            ]
        for rid in launching:
            status = self.status(rid)
            if status.state.alive:
                found[rid] = status
        return list(found.values())
