"""Test helpers for executors: the engine's secrets must not reach a replica (a public module).

An executor starts Triton with an allow-listed environment (`bioengine_core.childenv`): API
tokens, a Hypha admin secret or S3 keys in `bioengine serve`'s environment must reach neither
tritonserver nor the python backend stubs it starts. These helpers check that on the real
processes, through `/proc/PID/environ` (Linux), for the built-in executors and for a plugin
author's own:

```python
from bioengine_core.testing.environ import (
    check_replica_environ,
    set_engine_secrets,
    write_identity_model,
)


def test_replica_gets_no_engine_secrets(monkeypatch, executor, spec):
    secrets = set_engine_secrets(monkeypatch)  # before the executor starts anything
    spec.models = [write_identity_model(spec.repository.local_path)]  # runs in a stub process
    spec.repository.env = {"AWS_ACCESS_KEY_ID": "repo-key-id"}
    replica = executor.start(spec)
    ...  # wait until READY; the server's pid is backend-specific
    check_replica_environ(server_pid, secrets, {"AWS_ACCESS_KEY_ID": "repo-key-id"})
```
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from ..repository import default_python_paths

ENGINE_SECRETS = {
    "BIOENGINE_ADMIN_TOKEN": "admin-token-4b1d9e",
    "HYPHA_ADMIN_SECRET": "hypha-secret-9c2f07",
    "AWS_SECRET_ACCESS_KEY": "engine-s3-secret-77e1a3",
}
"""Secret-looking variables of the engine that no replica needs (not in any replica env)."""


def set_engine_secrets(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Put `ENGINE_SECRETS` into this process's environment (the engine's) for one test, and
    return them (name -> value)."""
    for key, value in ENGINE_SECRETS.items():
        monkeypatch.setenv(key, value)
    return dict(ENGINE_SECRETS)


def environ_of(pid: int) -> tuple[bytes, dict[str, str]]:
    """The environment process `pid` started with: raw /proc/PID/environ and parsed."""
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return raw, {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


def python_stubs(server: psutil.Process) -> list[psutil.Process]:
    """The `triton_python_backend_stub` processes below a tritonserver process."""
    return [
        p
        for p in server.children(recursive=True)
        if "triton_python_backend_stub" in " ".join([p.name(), *p.cmdline()[:1]])
    ]


def check_replica_environ(
    server_pid: int, secrets: dict[str, str], expected: dict[str, str]
) -> list[psutil.Process]:
    """Assert that tritonserver (`server_pid`) and its python backend stubs carry none of the
    `secrets` values and every `expected` variable; return the processes checked.

    A replica needs a loaded python-backend model (`write_identity_model`) to have a stub.
    """
    server = psutil.Process(server_pid)
    stubs = python_stubs(server)
    assert stubs, "a python-backend model runs in a triton_python_backend_stub process"
    for proc in [server, *stubs]:
        raw, env = environ_of(proc.pid)
        for name, value in secrets.items():
            assert value.encode() not in raw, f"{name} reached {proc.name()} ({proc.pid})"
        missing = {k: v for k, v in expected.items() if env.get(k) != v}
        assert not missing, f"{proc.name()} ({proc.pid}) lacks {missing}"
    return [server, *stubs]


IDENTITY_CONFIG = """name: "ident"
backend: "python"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]
"""
IDENTITY_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())]
            )
            for r in requests
        ]
"""


def write_identity_model(repository: Path, name: str = "ident") -> str:
    """Write a python-backend model `name` (y = x, 4 floats) into a Triton model repository
    directory and return its name (load it at start: `spec.models = [name]`).

    The stub ignores PYTHONPATH, so the model puts this interpreter's site-packages first on
    `sys.path`; else pb_utils may import another numpy and send empty outputs.
    """
    model = Path(repository) / name
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(IDENTITY_CONFIG.replace('"ident"', f'"{name}"', 1))
    paths = default_python_paths()
    (model / "1" / "model.py").write_text(
        f"import sys\nsys.path[:0] = {paths!r}\n" + IDENTITY_MODEL
    )
    return name


__all__ = [
    "ENGINE_SECRETS",
    "IDENTITY_CONFIG",
    "IDENTITY_MODEL",
    "check_replica_environ",
    "environ_of",
    "python_stubs",
    "set_engine_secrets",
    "write_identity_model",
]
