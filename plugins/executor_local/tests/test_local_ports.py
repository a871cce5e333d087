"""Firewalled hosts: `port_range` confines a replica's ports; `config check` finds what this host
lacks (the Triton binary, the container engine, free ports in the range)."""

from __future__ import annotations

import socket

import pytest
from bioengine_executor_local import LocalExecutorSettings, ProcessExecutor
from core_helpers import free_port, run_cli
from pydantic import ValidationError

from bioengine_core.contracts import ReplicaState
from bioengine_core.errors import ExecutorError
from bioengine_core.triton import is_ready


def a_range(width: int = 12) -> tuple[int, int]:
    low = 20000 + free_port() % 30000
    return low, low + width - 1


def wait_ready(executor, replica_id: str, timeout: float = 90.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = executor.status(replica_id)
        if status.state is ReplicaState.READY:
            return status
        assert status.state is not ReplicaState.FAILED, status.message
        time.sleep(0.3)
    raise AssertionError(f"{replica_id} not ready: {executor.logs(replica_id)}")


def test_replica_ports_come_from_the_range(triton, context, replica_spec):
    low, high = a_range()
    executor = ProcessExecutor(
        LocalExecutorSettings(stop_grace=5, port_range=f"{low}-{high}"), context
    )
    status = executor.start(replica_spec)
    try:
        ready = wait_ready(executor, status.replica_id)
        assert is_ready(ready.url)
        meta = next(m for m in executor._all_meta() if m["replica_id"] == status.replica_id)
        assert set(meta["ports"].values()) <= set(range(low, high + 1)), meta["ports"]
    finally:
        executor.stop(status.replica_id, grace=2)


def test_a_full_range_is_a_clear_error_naming_the_setting(context, replica_spec):
    low, high = a_range(4)
    held = []
    try:
        for port in range(low, high + 1):  # occupy all but one port of the range
            if port == high:
                break
            sock = socket.socket()
            sock.bind(("127.0.0.1", port))
            held.append(sock)
        settings = LocalExecutorSettings(port_range=f"{low}-{high}")
        with pytest.raises(ExecutorError, match=r"\[executor\] port_range = '.*': no 3 free"):
            ProcessExecutor(settings, context).start(replica_spec)
        site = context.config_dir / "site.toml"
        site.write_text(f'[executor]\nkind = "local"\nport_range = "{low}-{high}"\n')
        checked = run_cli("config", "check", "--config", str(site))
        assert checked.returncode == 2 and "widen port_range" in checked.stderr, checked.stderr
    finally:
        for sock in held:
            sock.close()


def test_bad_range_and_missing_binaries_are_named(tmp_path):
    with pytest.raises(ValidationError, match="port range like"):
        LocalExecutorSettings(port_range="9100")
    site = tmp_path / "site.toml"
    site.write_text('[executor]\nkind = "local"\ntriton_binary = "/nowhere/tritonserver"\n')
    result = run_cli("config", "check", "--config", str(site))
    assert result.returncode == 2
    assert "tritonserver binary not found: /nowhere/tritonserver" in result.stderr
    assert "fix [executor] triton_binary" in result.stderr
    site.write_text(
        '[executor]\nkind = "local"\nmode = "container"\ncontainer_engine = "singularity"\n'
    )
    result = run_cli("config", "check", "--config", str(site))
    assert result.returncode == 2
    assert "no singularity command is on PATH" in result.stderr


def test_config_check_names_the_key_of_a_bad_range(tmp_path):
    site = tmp_path / "site.toml"
    for value in ("9100", "9199-9100", "80-90"):
        site.write_text(f'[executor]\nkind = "local"\nport_range = "{value}"\n')
        result = run_cli("config", "check", "--offline", "--config", str(site))
        assert result.returncode == 2
        assert f"[executor] key 'port_range' = '{value}'" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
