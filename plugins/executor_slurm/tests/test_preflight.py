"""`bioengine config check` asks the real cluster whether it can give what [executor] asks
for, and says which key to change and to what; `--offline` leaves the cluster alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from bioengine_executor_slurm.preflight import megabytes, records
from core_helpers import run_cli

pytestmark = pytest.mark.usefixtures("slurm_cluster")


def site(tmp_path: Path, executor: str) -> str:
    path = tmp_path / "site.toml"
    path.write_text(
        f'[engine]\nname = "pf"\nstate_dir = "{tmp_path / "state"}"\n\n'
        f'[executor]\nkind = "slurm"\n{executor}\n'
    )
    return str(path)


def node_cpus() -> int:
    import subprocess

    text = subprocess.run(["scontrol", "show", "node", "-o"], capture_output=True, text=True)
    return max(int(r["CPUTot"]) for r in records(text.stdout))


def test_the_default_request_fits_the_test_cluster(tmp_path):
    ok = run_cli("config", "check", "--config", site(tmp_path, ""))
    assert ok.returncode == 0, ok.stderr


def test_too_many_cpus_names_the_key_and_the_nodes_cpu_count(tmp_path):
    cpus = node_cpus()
    path = site(tmp_path, f"cpus = {cpus + 2}")
    bad = run_cli("config", "check", "--config", path)
    assert bad.returncode == 2, bad.stdout
    assert f"[executor] cpus = {cpus + 2} but the largest node in partition 'debug' has {cpus}" in (
        bad.stderr
    )
    assert f"set [executor] cpus <= {cpus}" in bad.stderr
    assert run_cli("config", "check", "--offline", "--config", path).returncode == 0
    # serve refuses before submitting anything
    served = run_cli("serve", "--config", path, timeout=60)
    assert served.returncode == 2 and "set [executor] cpus" in served.stderr
    assert "Traceback" not in served.stderr
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    "executor, expected",
    [
        (
            'partition = "nope"',
            "partition = 'nope' does not exist on this cluster (partitions: debug)",
        ),
        ('memory = "512G"', "memory = '512G' but the largest node in partition 'debug' has"),
        ("gpus = 1", "gpus = 1 but the nodes of partition 'debug' have no GPU(s)"),
    ],
)
def test_what_the_partition_cannot_give_is_named(tmp_path, executor, expected):
    bad = run_cli("config", "check", "--config", site(tmp_path, executor))
    assert bad.returncode == 2
    assert expected in bad.stderr, bad.stderr


def test_the_example_passes_offline_and_fails_online_on_the_small_test_cluster():
    """examples/slurm.toml is a GPU site's config: valid, but this cluster cannot run it, and
    config check says exactly why."""
    example = Path(__file__).resolve().parents[1] / "examples" / "slurm.toml"
    env = {"BIOENGINE_INFERENCE_TOKEN": "t" * 32, "BIOENGINE_ADMIN_TOKEN": "a" * 32}
    assert (
        run_cli("config", "check", "--offline", "--config", str(example), env=env).returncode == 0
    )
    online = run_cli("config", "check", "--config", str(example), env=env)
    assert online.returncode == 2
    assert "partition = 'gpu' does not exist on this cluster" in online.stderr


def test_memory_units():
    assert megabytes("16G") == 16 * 1024 and megabytes("4000") == 4000
    assert megabytes("512M") == 512 and megabytes("UNLIMITED") is None
