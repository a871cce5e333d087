"""Helpers shared by the core's tests (importable: tests/ is on pytest's pythonpath)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run the installed `bioengine` command and capture its output."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [str(BIN / "bioengine"), *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd or ROOT,
        timeout=timeout,
    )


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """`bioengine serve` as a user runs it, in a subprocess, with its output collected."""

    def __init__(self, config: Path, *, env: dict[str, str] | None = None):
        import threading

        self.config = config
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [str(BIN / "bioengine"), "serve", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "COLUMNS": "200", **(env or {})},
            cwd=ROOT,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_serving(self, timeout: float = 240) -> None:
        """Wait for the 'is serving' line; fail with the output if serve exits or times out."""
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "is serving" in self.output:
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}:\n{self.output}")
            time.sleep(0.2)
        raise AssertionError(f"serve not ready after {timeout} s:\n{self.output}")

    def stop(self, sig: int = 15, timeout: float = 90) -> int:
        """Send `sig` and wait for the process to exit; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        return self.proc.returncode


def local_config(
    tmp: Path,
    *,
    port: int,
    replicas: int = 1,
    name: str = "e2e",
    extra_model: str = "",
    weight_format: str | None = None,
    executor: str = '[executor]\nkind = "local"\nmode = "process"\n',
    gateway: str = "",
) -> Path:
    """A site config like examples/local.toml, in `tmp`, on the given gateway port."""
    model = ROOT / "models" / "unet2d_nuclei_broad"
    wf = f'weight_format = "{weight_format}"\n' if weight_format else ""
    text = (
        f'[engine]\nname = "{name}"\nstate_dir = "{tmp / "state"}"\nreplicas = {replicas}\n'
        f"health_interval = 0.5\nstop_grace = 5\n\n{executor}\n"
        f'[storage]\nkind = "local"\n\n[gateways.http]\nkind = "http"\nport = {port}\n{gateway}\n'
        f'[[models]]\nsource = "folder:{model}"\n{wf}{extra_model}'
    )
    path = tmp / "site.toml"
    path.write_text(text)
    return path


def get_status(url: str) -> dict:
    """The engine's status JSON from the HTTP gateway."""
    import json
    import urllib.request

    with urllib.request.urlopen(f"{url}/bioengine/status", timeout=10) as resp:
        return json.loads(resp.read())


def triton_available() -> bool:
    """True when a tritonserver binary can be found (tests needing it use require_service)."""
    try:
        from bioengine_core.triton import find_triton

        find_triton()
        return True
    except Exception:
        return False


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    """Poll `predicate` until it returns something truthy (returned); fail naming `what`."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")
