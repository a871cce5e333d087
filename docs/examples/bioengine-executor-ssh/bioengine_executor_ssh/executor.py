"""The ssh executor: each replica is a nohup'ed `tritonserver` on a remote host."""

from __future__ import annotations

import json
import shlex
import uuid
from pathlib import Path

from bioengine_core.commands import run_command
from bioengine_core.contracts import (
    BackendContext,
    Executor,
    ReplicaSpec,
    ReplicaState,
    ReplicaStatus,
)
from bioengine_core.errors import ExecutorError
from bioengine_core.triton import is_ready
from bioengine_core.util import DEPLOYMENT_LABEL

from .settings import SshSettings

REMOTE_SOURCE = Path(__file__).with_name("remote.py").read_text()

SSH_ENV = ("SSH_AUTH_SOCK",)
"""What ssh needs of the engine's environment besides the core's allow-list (an agent)."""


class SshExecutor(Executor):
    """Starts, inspects and stops Triton replicas on `settings.host` through ssh."""

    def __init__(self, settings: SshSettings, context: BackendContext):
        self.settings = settings
        self.context = context

    # ---------------------------------------------------------------- ssh plumbing
    def _ssh(self) -> list[str]:
        """The ssh command line up to (and including) the destination."""
        s = self.settings
        cmd = ["ssh", "-p", str(s.port), "-o", "BatchMode=yes"]
        cmd += ["-o", f"ConnectTimeout={s.connect_timeout}"]
        if s.identity_file:
            cmd += ["-i", str(self.context.resolve_path(s.identity_file))]
        for option in s.ssh_options:
            cmd += ["-o", option]
        return [*cmd, f"{s.user}@{s.host}" if s.user else s.host]

    def _remote(self, op: str, timeout: float = 60, **args: object) -> object:
        """Run one operation of remote.py on the host and return its result."""
        request = json.dumps({"op": op, "state_dir": self.settings.state_dir, **args})
        program = f"{REMOTE_SOURCE}\nmain({request!r})\n"
        python = shlex.quote(self.settings.python)
        out = run_command(
            [*self._ssh(), f"{python} -"], input=program, timeout=timeout, allow_env=SSH_ENV
        )
        try:
            return json.loads(out.strip().splitlines()[-1])["result"]
        except (IndexError, KeyError, ValueError) as exc:
            raise ExecutorError(f"unexpected answer from {self.settings.host}: {out!r}") from exc

    def _remote_path(self, name: str) -> str:
        """`state_dir/name` quoted for the remote shell, keeping a leading `~/` expandable."""
        path = f"{self.settings.state_dir.rstrip('/')}/{name}"
        if path.startswith("~/"):
            return "~/" + shlex.quote(path[2:])
        return shlex.quote(path)

    # ---------------------------------------------------------------- helpers
    def _triton_command(self, spec: ReplicaSpec) -> list[str]:
        """tritonserver's arguments except the ports, which the remote side picks."""
        s = self.settings
        cmd = [s.tritonserver, f"--model-repository={spec.repository.uri}"]
        for api in ("http", "grpc", "metrics"):
            cmd.append(f"--{api}-address={s.bind_address}")
        cmd += ["--model-control-mode=explicit", "--exit-on-error=false"]
        if s.backend_directory:
            cmd.append(f"--backend-directory={s.backend_directory}")
        return cmd + [f"--load-model={name}" for name in spec.models]

    def _status(self, meta: dict, probe: bool = True) -> ReplicaStatus:
        """Turn remote metadata into a status, probing Triton's readiness over HTTP."""
        url = f"http://{self.settings.host}:{meta['http_port']}"
        if not meta["alive"]:
            state, message = ReplicaState.FAILED, "tritonserver exited; see logs()"
        elif probe and is_ready(url):
            state, message = ReplicaState.READY, ""
        else:
            state, message = ReplicaState.STARTING, "waiting for /v2/health/ready"
        return ReplicaStatus(
            replica_id=meta["replica_id"],
            state=state,
            url=url,
            host=self.settings.host,
            message=message,
            labels=meta["labels"],
            started_at=meta["started_at"],
            details={"pid": meta["pid"], "log": meta["log"]},
        )

    # ---------------------------------------------------------------- the contract
    def start(self, spec: ReplicaSpec) -> ReplicaStatus:
        """Launch Triton remotely and return at once (STARTING)."""
        meta = self._remote(
            "start",
            replica_id=f"ssh-{uuid.uuid4().hex[:12]}",
            command=self._triton_command(spec),
            env={**self.settings.env, **spec.repository.env, **spec.env},
            labels={**spec.labels, DEPLOYMENT_LABEL: spec.deployment},
            bind_address=self.settings.bind_address,
        )
        return self._status(meta, probe=False)

    def status(self, replica_id: str) -> ReplicaStatus:
        """READY/STARTING/FAILED from the remote metadata; STOPPED when there is none."""
        found = self._remote("inspect", replica_id=replica_id)
        if not found:
            return ReplicaStatus(replica_id=replica_id, state=ReplicaState.STOPPED)
        return self._status(found[0])

    def stop(self, replica_id: str, *, grace: float = 10.0) -> None:
        """TERM the replica's process group, KILL after `grace` seconds, forget it."""
        self._remote("stop", timeout=grace + 60, replica_id=replica_id, grace=grace)

    def logs(self, replica_id: str, *, tail: int = 200) -> str:
        """`tail` of the replica's remote log file ("" if there is none)."""
        log = self._remote_path(f"{replica_id}.log")
        return run_command(
            [*self._ssh(), f"tail -n {int(tail)} {log} 2>/dev/null || true"], allow_env=SSH_ENV
        )

    def list(self, deployment: str) -> list[ReplicaStatus]:
        """Alive replicas whose metadata carries `deployment`, whoever started them."""
        found = self._remote("inspect")
        mine = [m for m in found if m["labels"].get(DEPLOYMENT_LABEL) == deployment]
        return [self._status(m) for m in mine if m["alive"]]

    def preview(self, spec: ReplicaSpec) -> str:
        """The ssh and Triton command lines that start(spec) runs (ports are chosen remotely)."""
        ports = ["--http-port=FREE", "--grpc-port=FREE", "--metrics-port=FREE"]
        return shlex.join([*self._ssh(), "nohup", *self._triton_command(spec), *ports])

    def triton_backends(self) -> list[str]:
        """The backends the remote Triton has, as configured."""
        return list(self.settings.backends)
