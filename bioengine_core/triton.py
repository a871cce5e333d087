"""Locate and prepare a Triton Inference Server binary; build its command line and environment.

Shared by executors that start Triton directly (local processes, Slurm jobs without container).
Handles the traps of the pip-shipped server (nvidia-pytriton): the python backend stub must be
copied next to the backend for the running interpreter, and the stub needs this interpreter's
libpython on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ExecutorError


@dataclass
class TritonInstall:
    """A Triton binary together with the backend directory and environment it needs."""

    binary: Path
    backend_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    backends: list[str] = field(default_factory=list)
    """Names of the backends present in backend_dir (`python`, `onnxruntime`, `pytorch`, ...)."""


def _pytriton_root() -> Path | None:
    try:
        import pytriton  # noqa: PLC0415  (optional dependency: the `triton` extra)
    except ImportError:
        return None
    root = Path(pytriton.__file__).parent / "tritonserver"
    return root if (root / "bin" / "tritonserver").exists() else None


def _prepare_python_stub(backend_dir: Path) -> None:
    """Copy the python backend stub built for this interpreter next to the python backend."""
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    target = backend_dir / "python" / "triton_python_backend_stub"
    source = backend_dir.parent / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not source.exists():
        if target.exists():
            return
        raise ExecutorError(f"the pip-shipped Triton has no python backend stub for Python {py}")
    if not target.exists() or target.stat().st_size != source.stat().st_size:
        tmp = target.with_suffix(".tmp")
        shutil.copy2(source, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)


def find_triton(binary: str | None = None) -> TritonInstall:
    """Find `tritonserver`: an explicit path, then PATH, then the nvidia-pytriton wheel."""
    if binary:
        path = Path(binary).expanduser()
        if not path.exists():
            found = shutil.which(binary)
            if not found:
                raise ExecutorError(f"tritonserver binary not found: {binary}")
            path = Path(found)
        return _describe(path)
    on_path = shutil.which("tritonserver")
    if on_path:
        return _describe(Path(on_path))
    root = _pytriton_root()
    if root is None:
        raise ExecutorError(
            "no tritonserver found: put it on PATH, pass its path to find_triton() (your "
            "executor's setting for the binary), or `pip install nvidia-pytriton` (ships a CPU "
            "Triton with the python backend), or run Triton in a container"
        )
    return _describe(root / "bin" / "tritonserver")


def _describe(binary: Path) -> TritonInstall:
    binary = binary.resolve()
    env: dict[str, str] = {}
    backend_dir = None
    for candidate in (binary.parent.parent / "backends", Path("/opt/tritonserver/backends")):
        if candidate.is_dir():
            backend_dir = candidate
            break
    if backend_dir is not None and (backend_dir.parent / "python_backend_stubs").is_dir():
        _prepare_python_stub(backend_dir)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        libs = [libdir, str(binary.parent.parent / "external_libs"), str(binary.parent.parent)]
        old = os.environ.get("LD_LIBRARY_PATH", "")
        env["LD_LIBRARY_PATH"] = ":".join([p for p in libs if p] + ([old] if old else []))
    backends = sorted(p.name for p in backend_dir.iterdir() if p.is_dir()) if backend_dir else []
    return TritonInstall(binary=binary, backend_dir=backend_dir, env=env, backends=backends)


def triton_args(
    install: TritonInstall,
    repository: str,
    *,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    address: str = "127.0.0.1",
    models: list[str] | None = None,
    extra: list[str] | None = None,
) -> list[str]:
    """The tritonserver command line: explicit model control, given ports, listed models."""
    args = [
        str(install.binary),
        f"--model-repository={repository}",
        f"--http-address={address}",
        f"--http-port={http_port}",
        f"--grpc-address={address}",
        f"--grpc-port={grpc_port}",
        f"--metrics-address={address}",
        f"--metrics-port={metrics_port}",
        "--model-control-mode=explicit",
        "--exit-on-error=false",
        "--log-info=true",
    ]
    if install.backend_dir is not None:
        args.append(f"--backend-directory={install.backend_dir}")
    for name in models or []:
        args.append(f"--load-model={name}")
    return args + list(extra or [])


def is_ready(url: str, timeout: float = 2.0) -> bool:
    """True when the Triton server at `url` answers /v2/health/ready with 200."""
    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/v2/health/ready", timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def wait_ready(url: str, timeout: float, interval: float = 0.25) -> bool:
    """Poll `is_ready` until it answers True or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_ready(url):
            return True
        time.sleep(interval)
    return False
