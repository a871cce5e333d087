"""`.ci/start-slurm.sh` takes its ports from the environment (defaults: Slurm's own), says so at
its top, and is idempotent on the running test cluster."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("slurm_cluster")

SCRIPT = Path(__file__).resolve().parents[3] / ".ci" / "start-slurm.sh"


def test_every_port_variable_is_documented_with_its_default():
    text = SCRIPT.read_text()
    header = text.split("set -eu", 1)[0]
    found = dict(re.findall(r"\$\{([A-Z_]+PORT):-(\d+)\}", text))
    assert found == {"SLURMCTLD_PORT": "6817", "SLURMD_PORT": "6818"}
    for name, default in found.items():
        assert re.search(rf"#\s+{name}\s.*default {default}", header), name


def test_a_second_start_with_the_default_ports_keeps_the_cluster_up():
    run = subprocess.run(["sh", str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    config = subprocess.run(
        ["scontrol", "show", "config"], capture_output=True, text=True, check=True
    ).stdout
    assert re.search(r"^SlurmctldPort\s*=\s*6817$", config, re.M)
    assert re.search(r"^SlurmdPort\s*=\s*6818$", config, re.M)
    assert subprocess.run(["squeue", "-h"], capture_output=True).returncode == 0
