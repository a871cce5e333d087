"""`bioengine config check` asks the real cluster whether it can give what [executor] asks
for, and says which key to change and to what; `--offline` leaves the cluster alone."""

from __future__ import annotations

import re
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


def test_the_example_passes_online_on_the_test_cluster():
    """examples/slurm.toml is valid and fits the documented test cluster (2 CPUs, 4000 MB,
    partition debug): `config check` without --offline asks the cluster and says ok."""
    example = Path(__file__).resolve().parents[1] / "examples" / "slurm.toml"
    env = {"BIOENGINE_INFERENCE_TOKEN": "t" * 32, "BIOENGINE_ADMIN_TOKEN": "a" * 32}
    for offline in ([], ["--offline"]):
        run = run_cli("config", "check", *offline, "--config", str(example), env=env)
        assert run.returncode == 0, run.stdout + run.stderr


def test_an_unreachable_controller_is_one_clear_line(tmp_path):
    """SLURM_CONF naming a controller port nobody listens on: config check says so, fast
    (within the preflight's short timeout), and --offline does not ask."""
    from core_helpers import free_port

    # Drop the conf's own SlurmctldPort (start-slurm.sh writes one; a later line would win).
    conf = re.sub(r"(?im)^\s*SlurmctldPort\s*=.*\n?", "", Path("/etc/slurm/slurm.conf").read_text())
    bad = tmp_path / "slurm.conf"
    bad.write_text(f"SlurmctldPort={free_port()}\n{conf}")
    path = site(tmp_path, "")
    run = run_cli("config", "check", "--config", path, env={"SLURM_CONF": str(bad)})
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if "Slurm controller" in line]
    assert len(lines) == 1 and "does not answer `scontrol show partition`" in lines[0], run.stderr
    assert "config check --offline skips this" in lines[0] and "Traceback" not in run.stderr
    offline = run_cli(
        "config", "check", "--offline", "--config", path, env={"SLURM_CONF": str(bad)}
    )
    assert offline.returncode == 0, offline.stderr


def test_account_and_qos_are_checked_against_the_partition(tmp_path):
    """The test partition allows every account and QOS: no false alarm. A partition whose
    AllowAccounts/DenyQos exclude them (as `scontrol show partition -o` prints it) names the key
    and the partition's list."""
    import subprocess

    from bioengine_executor_slurm.preflight import _limits
    from bioengine_executor_slurm.settings import SlurmSettings

    ok = run_cli("config", "check", "--config", site(tmp_path, 'account = "lab"\nqos = "normal"'))
    assert ok.returncode == 0, ok.stderr
    show = subprocess.run(["scontrol", "show", "partition", "debug", "-o"], capture_output=True)
    part = records(show.stdout.decode())[0]
    nodes = records(
        subprocess.run(["scontrol", "show", "node", "-o"], capture_output=True).stdout.decode()
    )
    part.update(AllowAccounts="bio,chem", DenyQos="long", MaxCPUsPerNode="1", MaxTime="1:00:00")
    settings = SlurmSettings(account="lab", qos="long", cpus=2, time_limit="2:00:00")
    assert _limits(settings, "debug", part, nodes) == [
        "cpus = 2 but the largest node in partition 'debug' has 1 CPU(s): set [executor] cpus <= 1",
        "account = 'lab' may not use partition 'debug' (AllowAccounts=bio,chem): set [executor] "
        "account to one of bio, chem or choose another partition",
        "qos = 'long' may not use partition 'debug' (DenyQos=long): change [executor] qos or "
        "partition",
        "time_limit = '2:00:00' exceeds the MaxTime 1:00:00 of partition 'debug': set [executor] "
        "time_limit <= 1:00:00",
    ]


def test_memory_units():
    assert megabytes("16G") == 16 * 1024 and megabytes("4000") == 4000
    assert megabytes("512M") == 512 and megabytes("UNLIMITED") is None
