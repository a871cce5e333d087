"""The core's shape, as the plugin guide states it: a complete Service contract, state hooks for
adopted replicas, per-backend directories, safe process starts, small modules."""

from __future__ import annotations

import ast
import asyncio
import json
import urllib.request

import numpy as np
from core_helpers import ROOT, Serve, free_port, local_config, run_cli, triton_available

from bioengine_core.commands import start_process
from bioengine_core.config import EngineSettings
from bioengine_core.contracts import BackendContext, ReplicaSpec, RepositoryLocation
from bioengine_core.router import Router
from bioengine_core.supervisor import ReplicaSupervisor
from bioengine_core.testing.memory import MemoryExecutor
from bioengine_core.testing.pytest_plugin import require_service

CORE = ROOT / "bioengine_core"
MODEL = ROOT / "models" / "unet2d_nuclei_broad"
MODEL_ID = "unet2d_nuclei_broad"
MAX_LINES = 400


def test_core_modules_stay_small_or_say_why():
    """No module of the core is over ~400 lines unless its docstring gives the reason."""
    for path in sorted(CORE.rglob("*.py")):
        lines = path.read_text().count("\n")
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MAX_LINES:
            assert "Size:" in doc, f"{path.relative_to(ROOT)} has {lines} lines and no reason"


def test_gateways_use_the_service_contract_only():
    """The built-in HTTP gateway calls nothing on the service that the contract lacks."""
    from bioengine_core.contracts import Service

    used = {
        node.attr
        for module in ("gateway_http_app.py", "gateway_web.py", "gateway_jobs.py")
        for node in ast.walk(ast.parse((CORE / module).read_text()))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "service"
    }
    assert used and used <= set(dir(Service)), used - set(dir(Service))


class _Hook:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str | None]] = []

    def bioengine_replica_state_changed(self, *, replica, previous):
        self.calls.append((replica.replica_id, replica.state.value, previous))


def _spec(name: str) -> ReplicaSpec:
    return ReplicaSpec(
        deployment=name,
        repository=RepositoryLocation(uri="/nowhere"),
        labels={"bioengine.deployment": name},
    )


async def test_adopted_replicas_fire_the_state_hook():
    MemoryExecutor.reset("adopt-hook")
    spec = _spec("adopt-hook")
    earlier = MemoryExecutor("adopt-hook").start(spec)  # left running by an earlier engine
    hook = _Hook()
    router = Router()
    sup = ReplicaSupervisor(
        executor=MemoryExecutor("adopt-hook", ready_delay=0.0),
        router=router,
        settings=EngineSettings(replicas=1, ready_timeout=10),
        spec=lambda: spec,
        model_ids=lambda: [],
        hook=hook,
        say=lambda line: None,
        on_ready_count=lambda n: None,
    )
    try:
        await sup.start()
        assert hook.calls[0][0] == earlier.replica_id and hook.calls[0][2] is None
        assert sup.replicas[earlier.replica_id].adopted
        await sup.wait_ready(1)
        assert any(c[0] == earlier.replica_id and c[1] == "ready" for c in hook.calls)
        assert len(sup.replicas) == 1  # adopted, not started anew
    finally:
        await sup.stop_all()
        await router.close()
        MemoryExecutor.reset("adopt-hook")


def test_each_backend_gets_its_own_directory(tmp_path):
    ctx = BackendContext(deployment="d", state_dir=tmp_path, config_dir=tmp_path)
    slurm = ctx.for_backend("executor", "slurm").backend_dir
    s3 = ctx.for_backend("storage", "s3").backend_dir
    assert slurm != s3 and slurm.is_dir() and s3.is_dir()
    assert slurm.parent == s3.parent == tmp_path / "backends"
    assert ctx.state_dir == ctx.for_backend("executor", "slurm").state_dir  # shared root stays


def test_start_process_logs_its_command_and_gets_no_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOENGINE_ADMIN_TOKEN", "not-for-children-0123456789")
    log = tmp_path / "logs" / "server.log"
    proc = start_process(
        ["sh", "-c", "env; echo pgid=$(ps -o pgid= $$)"], log_path=log, env={"WANTED": "yes"}
    )
    assert proc.wait(timeout=10) == 0
    text = log.read_text()
    assert text.splitlines()[0].startswith("# bioengine: sh -c")
    assert "WANTED=yes" in text and "not-for-children" not in text
    assert f"pgid={proc.pid}" in text.replace(" ", "")  # a session (and group) of its own


def test_outside_gateway_serves_through_the_contract(contract_gateway_site, tmp_path):
    """A third-party gateway that only knows the Service contract offers /health and /metrics,
    and `bioengine status` / `bioengine infer` work against it."""
    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    source = (contract_gateway_site / "bioengine_gateway_contract" / "__init__.py").read_text()
    imported = {
        node.module
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert {m for m in imported if m.startswith("bioengine_core")} <= {
        "bioengine_core.contracts",
        "bioengine_core.errors",
        "bioengine_core.hookspecs",
    }
    port = free_port()
    cfg = local_config(tmp_path, port=free_port(), name="e2e-contract")
    cfg.write_text(cfg.read_text() + f'\n[gateways.outside]\nkind = "contract"\nport = {port}\n')
    serve = Serve(cfg, env={"PYTHONPATH": str(contract_gateway_site)})
    try:
        serve.wait_serving()
        url = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{url}/health", timeout=10) as resp:
            health = json.loads(resp.read())
        assert health == {"replicas_ready": 1, "models": [MODEL_ID]}
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
            assert b"bioengine_replicas_ready 1.0" in resp.read()
        result = run_cli("status", "--url", url)
        assert result.returncode == 0 and "1/1 replicas ready" in result.stdout, result.stderr
        out = tmp_path / "y.npy"
        result = run_cli(
            "infer", "--url", url, "--model", MODEL_ID,
            "--input", str(MODEL / "test_input.npy"), "--output", str(out),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        expected = np.load(MODEL / "test_output.npy")
        np.testing.assert_allclose(np.load(out), expected, atol=1e-4, rtol=1e-4)
    finally:
        assert serve.stop() == 0


def test_no_plugin_imports_private_core_modules():
    """Plugins import only the core's public modules (the guide's list)."""
    public = {
        "bioengine_core",
        "bioengine_core.contracts",
        "bioengine_core.hookspecs",
        "bioengine_core.errors",
        "bioengine_core.commands",
        "bioengine_core.childenv",
        "bioengine_core.util",
        "bioengine_core.site",
        "bioengine_core.triton",
        "bioengine_core.modelcache",
    }
    offenders = []
    roots = [ROOT / "plugins", ROOT / "docs" / "examples"]
    for path in sorted(p for root in roots for p in root.rglob("*.py")):
        if "/tests/" in str(path) or ".egg-info" in str(path):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "bioengine_core"
            ):
                if node.module not in public and not node.module.startswith(
                    "bioengine_core.testing"
                ):
                    offenders.append(f"{path.relative_to(ROOT)}: {node.module}")
    assert not offenders, offenders


def test_no_asyncio_in_executor_contract():
    """Executors are synchronous (the engine runs them in threads): no async def in the ABC."""
    from bioengine_core.contracts import Executor

    assert not any(asyncio.iscoroutinefunction(f) for f in vars(Executor).values())
