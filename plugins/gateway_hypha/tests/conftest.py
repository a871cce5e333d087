"""Fixtures: a real Hypha server on 127.0.0.1 and a small real Service to expose through it."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bioengine_core.contracts import BackendContext, ModelInfo, Service
from bioengine_core.errors import InvalidInputError, ModelNotFoundError
from bioengine_core.testing.pytest_plugin import require_service


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def hypha_available() -> bool:
    """True if `python -m hypha.server` can be imported here."""
    import importlib.util

    return importlib.util.find_spec("hypha") is not None


class HyphaProcess:
    """A real `python -m hypha.server` on 127.0.0.1 that a test can stop and start again."""

    def __init__(self, log_dir: Path) -> None:
        self.port = _free_port()
        self.root_token = secrets.token_urlsafe(32)
        self.log = log_dir / f"hypha-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180.0) -> None:
        env = dict(os.environ, HYPHA_ROOT_TOKEN=self.root_token, HYPHA_LOGLEVEL="WARNING")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "hypha.server",
                    "--from-env",
                    "--host=127.0.0.1",
                    f"--port={self.port}",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hypha exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health/readiness", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"hypha not ready in {timeout} s: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture(scope="session")
def hypha_server(tmp_path_factory: pytest.TempPathFactory):
    """One real Hypha server for the session (skips locally / fails in CI without hypha)."""
    require_service(hypha_available(), "the Hypha server package (hypha[s3])")
    server = HyphaProcess(tmp_path_factory.mktemp("hypha"))
    try:
        server.start()
    except RuntimeError as exc:
        require_service(False, f"a Hypha server ({exc})")
    yield server
    server.stop()


@pytest.fixture
def fresh_hypha_server(tmp_path: Path):
    """A Hypha server of its own, for tests that stop and restart it."""
    require_service(hypha_available(), "the Hypha server package (hypha[s3])")
    server = HyphaProcess(tmp_path)
    server.start()
    yield server
    server.stop()


# --------------------------------------------------------------------------- a small Service


def _tensor(tid: str, axes: str = "bcyx") -> dict[str, Any]:
    return {
        "id": tid,
        "dtype": "float32",
        "shape": [1, 1, -1, -1],
        "axes": list(axes),
        "description": f"tensor {tid}",
    }


class ToyService(Service):
    """Two numpy 'models' with test data; records administrative calls."""

    def __init__(self) -> None:
        rng = np.random.default_rng(0)
        self.test_input = rng.random((1, 1, 8, 8), dtype=np.float32)
        self.models = {
            "double": ModelInfo(
                "double",
                "Doubler",
                "multiplies the image by two (nuclei)",
                [_tensor("x")],
                [_tensor("y")],
                "onnx",
                ["nuclei", "toy"],
            ),
            "sum": ModelInfo(
                "sum",
                "Adder",
                "adds two images",
                [_tensor("a"), _tensor("b")],
                [_tensor("s"), _tensor("d")],
                "torchscript",
                ["toy"],
            ),
        }
        # offered but not loaded, as in catalog mode: loaded by ensure_model on first use
        self.offered = {
            "triple": ModelInfo(
                "triple", "Tripler", "multiplies by three", [_tensor("x")], [_tensor("y")],
                "onnx", ["toy", "catalog"],
            )
        }  # fmt: skip
        self.calls: list[tuple[str, Any]] = []
        self.checked: list[tuple[str, dict[str, Any]]] = []
        self.replicas = 1

    async def ensure_model(self, model_id: str) -> None:
        if model_id in self.offered:
            self.calls.append(("ensure_model", model_id))
            self.models[model_id] = self.offered.pop(model_id)
        self._model(model_id)

    def search_models(self, query: str = "", limit: int = 50) -> list[dict[str, Any]]:
        rows = super().search_models(query, limit)
        for info in self.offered.values():
            text = " ".join([info.id, info.name, info.description, *info.tags]).lower()
            if all(w in text for w in query.lower().split()):
                rows.append({"id": info.id, "name": info.name, "tags": info.tags,
                             "description": info.description, "state": "available"})  # fmt: skip
        return rows[:limit]

    def _model(self, model_id: str) -> ModelInfo:
        if model_id not in self.models:
            raise ModelNotFoundError(model_id, list(self.models))
        return self.models[model_id]

    def list_models(self) -> list[ModelInfo]:
        return list(self.models.values())

    def get_model(self, model_id: str) -> dict[str, Any]:
        info = self._model(model_id)
        return {
            "type": "model",
            "id": info.id,
            "name": info.name,
            "format_version": "0.5.3",
            "inputs": info.inputs,
            "outputs": info.outputs,
        }

    async def infer(self, model_id, inputs, *, timeout=None):
        info = self._model(model_id)
        if isinstance(inputs, list):
            if len(inputs) != len(info.inputs):
                raise InvalidInputError(f"{model_id} takes {len(info.inputs)} inputs")
            inputs = {t["id"]: a for t, a in zip(info.inputs, inputs, strict=True)}
        missing = [t["id"] for t in info.inputs if t["id"] not in inputs]
        if missing:
            raise InvalidInputError(f"missing input(s): {', '.join(missing)}")
        if model_id in ("double", "triple"):
            factor = 2 if model_id == "double" else 3
            return {"y": (inputs["x"] * factor).astype(np.float32)}
        return {"s": inputs["a"] + inputs["b"], "d": inputs["a"] - inputs["b"]}

    async def infer_raw(self, model_id, body, headers, *, timeout=None):
        raise NotImplementedError

    def check_inputs(self, model_id, specs):
        """Ids, dtype float32 and shape [1, 1, y, x] of every input; records each call."""
        info = self._model(model_id)
        self.checked.append((model_id, dict(specs)))
        ids = [t["id"] for t in info.inputs]
        missing = [i for i in ids if i not in specs]
        if missing:
            raise InvalidInputError(f"missing input(s): {', '.join(missing)}")
        unknown = [k for k in specs if k not in ids]
        if unknown:
            raise InvalidInputError(f"unknown input(s): {', '.join(unknown)}")
        for tid, (shape, dtype) in specs.items():
            if dtype != "float32":
                raise InvalidInputError(f"input '{tid}': dtype {dtype}, expected float32")
            if len(shape) != 4 or tuple(shape[:2]) != (1, 1):
                raise InvalidInputError(
                    f"input '{tid}': shape {list(shape)}, expected [1, 1, y, x]"
                )

    async def test_model(self, model_id: str) -> dict[str, Any]:
        out = await self.infer(model_id, [self.test_input] * len(self._model(model_id).inputs))
        expected = self.test_input * 2 if model_id == "double" else self.test_input * 2
        key = "y" if model_id == "double" else "s"
        err = float(np.abs(out[key] - expected).max())
        return {
            "model_id": model_id,
            "passed": err < 1e-4,
            "outputs": {key: {"max_abs_error": err}},
        }

    def model_ids(self) -> list[str]:
        return sorted(self.models)

    async def triton_get(self, model_id, what="metadata", *, version=None):
        self._model(model_id)
        return 200, b"{}"

    def ready_replicas(self) -> int:
        return 1

    def metrics_text(self) -> bytes:
        return b""

    def status(self) -> dict[str, Any]:
        return {
            "deployment": "toy",
            "target_replicas": self.replicas,
            "models": [{"id": m} for m in self.models],
            "path": Path("/tmp"),
        }

    async def load_model(self, ref: str, *, model_id: str | None = None) -> str:
        self.calls.append(("load_model", ref))
        new_id = model_id or ref.rsplit("/", 1)[-1]
        self.models[new_id] = ModelInfo(
            new_id, new_id, "loaded", [_tensor("x")], [_tensor("y")], "onnx"
        )
        return new_id

    async def unload_model(self, model_id: str) -> None:
        self.calls.append(("unload_model", model_id))
        self._model(model_id)
        del self.models[model_id]

    async def scale(self, replicas: int) -> None:
        self.calls.append(("scale", replicas))
        self.replicas = replicas


@pytest.fixture
def toy_service() -> ToyService:
    return ToyService()


@pytest.fixture
def backend_context(tmp_path: Path) -> BackendContext:
    return BackendContext(deployment="test", state_dir=tmp_path / "state", config_dir=tmp_path)
