"""Process mode: every replica is a `tritonserver` process on this host, tracked by pid files.

Each replica gets three free ports (HTTP, gRPC, metrics), a log file, and a metadata file
`STATE_DIR/local/replicas/<id>.json` holding its pid, the process start time (so a recycled pid is
never mistaken for the replica), ports, url and labels. Processes run in their own session, so
killing `bioengine serve` leaves them running; the next `serve` adopts them through `list()`.
Apptainer/Singularity containers run the same way (`ApptainerExecutor`): without a daemon the
container is just a process with host networking.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bioengine_core.commands import start_process
from bioengine_core.contracts import (
    BackendContext,
    Executor,
    ReplicaSpec,
    ReplicaState,
    ReplicaStatus,
)
from bioengine_core.errors import ExecutorError
from bioengine_core.triton import TritonInstall, find_triton, is_ready, triton_args
from bioengine_core.util import DEPLOYMENT_LABEL, connect_host, read_json, write_json

from .common import (
    APPTAINER_CLIENT_ALLOW,
    REPLICA_ALLOW,
    is_secret_name,
    new_replica_id,
    replica_labels,
    replica_ports,
    tail_file,
)
from .settings import LocalExecutorSettings


def _shown_env(env: dict[str, str], secret: set[str]) -> str:
    """`K=V` pairs for previews; values of `secret` and secret-looking variables are hidden."""
    shown = []
    for key in sorted(env):
        hidden = any(key == n or key.endswith(f"_{n}") for n in secret) or is_secret_name(key)
        shown.append(f"{key}=***" if hidden else f"{key}={shlex.quote(env[key])}")
    return " ".join(shown)


class ProcessExecutor(Executor):
    """Runs each replica as a local `tritonserver` process (mode = "process")."""

    inherit: tuple[str, ...] = REPLICA_ALLOW
    """Engine variables (names, patterns) the started process inherits besides the base set."""

    def __init__(self, settings: LocalExecutorSettings, context: BackendContext):
        self.settings = settings
        self.context = context
        base = Path(context.state_dir) / "local"
        self.replica_dir = base / "replicas"
        self.log_dir = context.resolve_path(settings.log_dir) if settings.log_dir else base / "logs"
        self.replica_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._children: dict[str, subprocess.Popen] = {}
        self._failed: dict[str, ReplicaStatus] = {}
        self._install: TritonInstall | None = None
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ the command

    def triton(self) -> TritonInstall:
        """The tritonserver this executor runs (found once, stub prepared)."""
        if self._install is None:
            try:
                self._install = find_triton(self.settings.triton_binary)
            except ExecutorError as exc:
                raise ExecutorError(
                    f"{exc} (local executor: set [executor] triton_binary, or "
                    "`pip install 'bioengine-executor-local[triton]'`, or mode = \"container\")"
                ) from None
        return self._install

    def triton_backends(self) -> list[str]:
        """Backends present next to the binary (the pip-shipped Triton has only `python`)."""
        return list(self.triton().backends) or ["python"]

    def _gpu_env(self, spec: ReplicaSpec) -> dict[str, str]:
        """CUDA_VISIBLE_DEVICES when the operator pinned device ids; else the host's default."""
        gpus = self.settings.gpus
        return {"CUDA_VISIBLE_DEVICES": gpus} if gpus and gpus != "all" else {}

    def command(self, spec: ReplicaSpec, ports: dict[str, int]) -> tuple[list[str], dict[str, str]]:
        """The argv and the replica's own variables (added to an allow-listed base at start)."""
        install = self.triton()
        argv = triton_args(
            install,
            spec.repository.uri,
            http_port=ports["http"],
            grpc_port=ports["grpc"],
            metrics_port=ports["metrics"],
            address=self.settings.address,
            models=spec.models,
            extra=self.settings.server_args(),
        )
        env = {
            **install.env,
            **self._gpu_env(spec),
            **self.settings.env,
            **spec.repository.env,
            **spec.env,
        }
        return argv, env

    def preview(self, spec: ReplicaSpec) -> str:
        """The command line start(spec) runs; ports are examples (free ones are picked at start)."""
        try:
            argv, env = self.command(spec, {"http": 8000, "grpc": 8001, "metrics": 8002})
        except ExecutorError as exc:
            return f"# cannot render the command: {exc}"
        return (
            "# ports 8000-8002 stand for the free ports chosen at start\n"
            f"{_shown_env(env, set(spec.repository.env))} {shlex.join(argv)}".strip()
        )

    # ------------------------------------------------------------------ files

    def _meta_path(self, replica_id: str) -> Path:
        return self.replica_dir / f"{replica_id}.json"

    def log_path(self, replica_id: str) -> Path:
        """Where the replica's server output goes."""
        return self.log_dir / f"{replica_id}.log"

    def _load(self, replica_id: str) -> dict[str, Any] | None:
        if "/" in replica_id or replica_id.startswith("."):
            return None
        return read_json(self._meta_path(replica_id))

    def _all_meta(self) -> list[dict[str, Any]]:
        metas = []
        for path in sorted(self.replica_dir.glob("*.json")):
            meta = read_json(path)
            if meta and meta.get("replica_id") == path.stem:
                metas.append(meta)
        return metas

    # ------------------------------------------------------------------ life cycle

    def start(self, spec: ReplicaSpec) -> ReplicaStatus:
        """Launch tritonserver in its own session and return at once (STARTING)."""
        with self._lock:
            replica_id = new_replica_id(spec.deployment)
            used = [p for m in self._all_meta() for p in m.get("ports", {}).values()]
            http, grpc, metrics = replica_ports(self.settings, used)
            ports = {"http": http, "grpc": grpc, "metrics": metrics}
            argv, extra_env = self.command(spec, ports)
            proc = self._launch(replica_id, argv, extra_env)
            meta = self._metadata(spec, replica_id, proc, ports, argv)
            write_json(self._meta_path(replica_id), meta)
            self._children[replica_id] = proc
        self.context.logger.info(
            "started replica %s (pid %d) at %s", replica_id, proc.pid, meta["url"]
        )
        return self._running_status(meta, ReplicaState.STARTING)

    def _launch(self, replica_id: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        """Start the process in a session of its own (it survives the engine; killpg reaches its
        children), logging to its log file.

        Its environment is the allow-list plus `inherit` and `env`: nothing else of the engine's
        environment (API tokens, admin secrets, S3 keys of other components) reaches Triton or
        its python backend stubs.
        """
        return start_process(
            argv,
            log_path=self.log_path(replica_id),
            env=env,
            allow_env=self.inherit,
            cwd=self.replica_dir,
        )

    def _metadata(
        self,
        spec: ReplicaSpec,
        replica_id: str,
        proc: subprocess.Popen,
        ports: dict[str, int],
        argv: list[str],
    ) -> dict[str, Any]:
        """What the replica's metadata file records (adoption by a later engine)."""
        try:
            create_time = psutil.Process(proc.pid).create_time()
        except psutil.Error:
            create_time = None  # already gone: status() reports its exit code
        return {
            "replica_id": replica_id,
            "pid": proc.pid,
            "create_time": create_time,
            "ports": ports,
            "url": f"http://{connect_host(self.settings.address)}:{ports['http']}",
            "deployment": spec.deployment,
            "labels": replica_labels(spec.deployment, replica_id, spec.labels),
            "started_at": time.time(),
            "log": str(self.log_path(replica_id)),
            "argv": argv,
        }

    def _running_status(self, meta: dict[str, Any], state: ReplicaState) -> ReplicaStatus:
        return ReplicaStatus(
            replica_id=meta["replica_id"],
            state=state,
            url=meta["url"],
            host=connect_host(self.settings.address),
            labels=dict(meta.get("labels", {})),
            started_at=meta.get("started_at"),
            details={"pid": meta["pid"], "ports": meta.get("ports", {}), "log": meta.get("log")},
        )

    def _exit(self, meta: dict[str, Any]) -> tuple[bool, str]:
        """(alive, why-not) for the replica's process; guards against recycled pids."""
        child = self._children.get(meta["replica_id"])
        if child is not None:
            code = child.poll()
            if code is None:
                return True, ""
            return False, f"tritonserver exited with code {code}"
        try:
            proc = psutil.Process(meta["pid"])
            created = meta.get("create_time")
            if created is not None and abs(proc.create_time() - created) > 1.0:
                return False, f"tritonserver (pid {meta['pid']}) is gone (pid reused)"
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False, f"tritonserver (pid {meta['pid']}) exited"
            return True, ""
        except psutil.NoSuchProcess:
            return False, (
                f"tritonserver (pid {meta['pid']}) is gone; exit code unknown (it was started "
                "by an earlier engine)"
            )
        except psutil.Error as exc:
            return True, f"cannot inspect pid {meta['pid']}: {exc}"

    def status(self, replica_id: str) -> ReplicaStatus:
        """READY when /v2/health/ready answers, STARTING before, FAILED if the process died."""
        with self._lock:
            if replica_id in self._failed:
                return self._failed[replica_id]
            meta = self._load(replica_id)
            if meta is None:
                return ReplicaStatus(replica_id=replica_id, state=ReplicaState.STOPPED)
            alive, why = self._exit(meta)
            if not alive:
                return self._mark_failed(meta, why)
        if is_ready(meta["url"], timeout=1.0):
            return self._running_status(meta, ReplicaState.READY)
        age = time.time() - meta.get("started_at", time.time())
        if age > self.settings.start_timeout:
            self.stop(replica_id)
            with self._lock:
                return self._mark_failed(
                    meta, f"not ready after {self.settings.start_timeout:.0f} s; stopped it"
                )
        return self._running_status(meta, ReplicaState.STARTING)

    def _mark_failed(self, meta: dict[str, Any], why: str) -> ReplicaStatus:
        replica_id = meta["replica_id"]
        try:  # a killed server leaves its python backend stubs behind in its process group
            os.killpg(meta["pid"], signal.SIGKILL)
        except OSError:
            pass
        tail = self.logs(replica_id, tail=15)
        status = self._running_status(meta, ReplicaState.FAILED)
        status.message = f"{why}\n{tail}".strip()
        self._failed[replica_id] = status
        self._forget(replica_id)
        self.context.logger.warning("replica %s failed: %s", replica_id, why)
        return status

    def _forget(self, replica_id: str) -> None:
        self._meta_path(replica_id).unlink(missing_ok=True)
        child = self._children.pop(replica_id, None)
        if child is not None:
            child.poll()  # reap

    def stop(self, replica_id: str, *, grace: float | None = None) -> None:
        """SIGTERM the server, SIGKILL (its whole process group) after `grace` seconds. Idempotent."""
        grace = self.settings.stop_grace if grace is None else grace
        with self._lock:
            self._failed.pop(replica_id, None)
            meta = self._load(replica_id)
            if meta is None:
                return
            alive, _ = self._exit(meta)
            child = self._children.get(replica_id)
        if alive:
            pid = meta["pid"]
            # SIGTERM to tritonserver only: it shuts its python backend stubs down itself.
            self._signal(pid, signal.SIGTERM)
            if not self._wait_gone(pid, child, grace):
                self.context.logger.warning(
                    "replica %s ignored SIGTERM for %.0f s: SIGKILL", replica_id, grace
                )
                self._signal(pid, signal.SIGKILL)
                self._wait_gone(pid, child, 10.0)
            try:  # leftovers of its process group (stubs of a killed server) go too
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        with self._lock:
            self._forget(replica_id)
        self.context.logger.info("stopped replica %s", replica_id)

    @staticmethod
    def _signal(pid: int, sig: signal.Signals) -> None:
        try:
            os.kill(pid, sig)
        except OSError:
            pass

    @staticmethod
    def _wait_gone(pid: int, child: subprocess.Popen | None, timeout: float) -> bool:
        if child is not None:
            try:
                child.wait(timeout=timeout)
                return True
            except subprocess.TimeoutExpired:
                return False
        try:
            proc = psutil.Process(pid)
        except psutil.NoSuchProcess:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if proc.status() == psutil.STATUS_ZOMBIE:
                    return True
            except psutil.NoSuchProcess:
                return True
            time.sleep(0.05)
        return False

    def logs(self, replica_id: str, *, tail: int = 200) -> str:
        """The last `tail` lines of the replica's log file (kept after it stopped)."""
        if "/" in replica_id or replica_id.startswith("."):
            return ""
        return tail_file(self.log_path(replica_id), tail)

    def list(self, deployment: str) -> list[ReplicaStatus]:
        """Alive replicas of `deployment` from the metadata files, whoever started them."""
        found = []
        for meta in self._all_meta():
            if meta.get("labels", {}).get(DEPLOYMENT_LABEL) != deployment:
                continue
            status = self.status(meta["replica_id"])
            if status.state.alive:
                found.append(status)
        return found


class ApptainerExecutor(ProcessExecutor):
    """Runs each replica as `apptainer exec IMAGE tritonserver ...` (or singularity).

    Apptainer has no daemon and uses the host network, so the container is an ordinary process
    tracked exactly like process mode (pid files, logs, adoption).
    """

    inherit = APPTAINER_CLIENT_ALLOW

    def triton_backends(self) -> list[str]:
        """What the configured image provides (setting `container_backends`)."""
        return list(self.settings.container_backends)

    def command(self, spec: ReplicaSpec, ports: dict[str, int]) -> tuple[list[str], dict[str, str]]:
        """`apptainer exec ...` and the APPTAINERENV_* variables carrying the replica's env."""
        from .container import apptainer_command

        return apptainer_command(self.settings, spec, ports)
