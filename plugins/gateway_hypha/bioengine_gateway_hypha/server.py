"""The embedded Hypha server: Hypha's own main as a managed child process."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from bioengine_core.childenv import child_env
from bioengine_core.errors import BioEngineError
from bioengine_core.util import connect_host, free_port, url_host

log = logging.getLogger("bioengine.gateway.hypha")


SERVER_ENV_ALLOW = ("HYPHA_*", "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
"""Variables the embedded server inherits besides the core's BASE_ALLOW: the operator's Hypha
options (`--from-env`) and what Python needs to import the same packages."""


class HyphaServerError(BioEngineError):
    """The embedded Hypha server could not be started."""


def hypha_installed() -> bool:
    """True if the Hypha server package can be imported by this interpreter."""
    import importlib.util

    return importlib.util.find_spec("hypha") is not None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to SIGTERM the child when the engine process dies (no orphaned servers)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedHyphaServer:
    """Starts, watches and stops one local Hypha server bound to `host:port`."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        log_path: Path,
        extra_args: Sequence[str] = (),
        public_url: str | None = None,
        root_token: str | None = None,
        ws_compression: bool = False,
        withhold_env: Sequence[str] = (),
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self.extra_args = list(extra_args)
        self.public_url = public_url
        # Strong random root token, handed to the child through its environment (not argv).
        self.root_token = root_token or secrets.token_urlsafe(32)
        self.ws_compression = ws_compression
        self.withhold_env = list(withhold_env)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Base URL of the server as this host reaches it."""
        return f"http://{url_host(connect_host(self.host))}:{self.port}"

    def command(self) -> list[str]:
        """The command line that starts the server (no secrets in it).

        `_hypha_main` is `python -m hypha.server` with uvicorn's WebSocket compression set.
        """
        cmd = [
            sys.executable,
            "-m",
            "bioengine_gateway_hypha._hypha_main",
            "--from-env",
            f"--host={self.host}",
            f"--port={self.port}",
        ]
        if self.public_url:
            cmd.append(f"--public-base-url={self.public_url}")
        return cmd + self.extra_args

    def environment(self) -> dict[str, str]:
        """The child's environment: an allow-list (see `SERVER_ENV_ALLOW`) plus its own settings.

        Secrets of `bioengine serve` (S3 keys, API tokens, the variables named in
        `withhold_env`) do not reach the Hypha server; its root token is its own.
        """
        env = child_env(allow=SERVER_ENV_ALLOW)
        for name in self.withhold_env:
            env.pop(name, None)
        env.setdefault("HYPHA_LOGLEVEL", "WARNING")
        env["HYPHA_ROOT_TOKEN"] = self.root_token
        env["BIOENGINE_HYPHA_WS_DEFLATE"] = "true" if self.ws_compression else "false"
        return env

    def running(self) -> bool:
        """True while the child process is alive."""
        return self.process is not None and self.process.poll() is None

    async def start(self, timeout: float = 180.0) -> None:
        """Start the child and wait until `/health/readiness` answers 200."""
        if self.running():
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = self.environment()
        logfile = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        try:
            # Not bioengine_core.commands.start_process: that offers no preexec_fn, and this
            # child must get PDEATHSIG (no Hypha server outlives a killed engine). Popen runs
            # in the event-loop thread: PDEATHSIG follows the thread that forked.
            self.process = subprocess.Popen(
                self.command(),
                stdout=logfile,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        finally:
            logfile.close()
        log.info("embedded Hypha server starting (pid %d) at %s", self.process.pid, self.url)
        await self.wait_ready(timeout)

    async def wait_ready(self, timeout: float) -> None:
        """Poll the readiness endpoint; HyphaServerError with the log tail on exit or timeout."""
        deadline = time.monotonic() + timeout
        probe = aiohttp.ClientTimeout(total=2)
        async with aiohttp.ClientSession(timeout=probe) as session:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    raise HyphaServerError(
                        f"embedded Hypha server exited with code {self.process.returncode} "
                        f"before it was ready; log {self.log_path}:\n{self.log_tail()}"
                    )
                try:
                    async with session.get(self.url + "/health/readiness") as resp:
                        if resp.status == 200:
                            return
                except (TimeoutError, aiohttp.ClientError, OSError):
                    pass
                if time.monotonic() > deadline:
                    await self.stop()
                    raise HyphaServerError(
                        f"embedded Hypha server not ready after {timeout:.0f} s; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.5)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines the server wrote."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `grace` seconds. Idempotent."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        deadline = time.monotonic() + grace
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if proc.poll() is None:
            proc.kill()
            await asyncio.to_thread(proc.wait, 5)
        log.info("embedded Hypha server stopped")
