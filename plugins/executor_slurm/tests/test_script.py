"""Rendered batch scripts match reviewed golden files; settings and Slurm output parsing.

Regenerate the golden files after a deliberate template change with
`BIOENGINE_UPDATE_GOLDEN=1 pytest plugins/executor_slurm/tests/test_script.py` and review the diff.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from bioengine_executor_slurm import SlurmExecutor, SlurmSettings
from bioengine_executor_slurm.script import job_comment, parse_comment
from bioengine_executor_slurm.slurm import job_from_json, job_from_text, parse_duration
from pydantic import ValidationError

from bioengine_core.config import load_config
from bioengine_core.contracts import BackendContext, ReplicaSpec, RepositoryLocation
from bioengine_core.errors import ConfigError

GOLDEN = Path(__file__).parent / "golden"
PY = "/opt/bioengine/venv/bin/python"
SHARED = "/shared/bioengine"

CASES: dict[str, dict] = {
    # Only what must be set: site defaults for partition, memory, account.
    "minimal": {},
    # A CPU site with every scheduling option and module setup.
    "cpu_full": dict(
        partition="cpu",
        account="imaging-lab",
        qos="long",
        time_limit="1-00:00:00",
        cpus=8,
        memory="32G",
        constraint="skylake&ib",
        extra_sbatch=["--exclusive", "#SBATCH --mail-type=END"],
        setup=["module purge", "module load python/3.11", "export OMP_NUM_THREADS=8"],
        triton_binary="/opt/tritonserver/bin/tritonserver",
        advertise_host="node-ib.cluster.local",
        triton_args=["--log-verbose=1"],
    ),
    # GPUs through --gres with a type, Triton in an Apptainer image.
    "gpu_gres_apptainer": dict(
        partition="gpu",
        gpus=2,
        gpu_type="a100",
        memory="64G",
        time_limit="12:00:00",
        container="apptainer",
        image="/shared/images/tritonserver_24.08-py3.sif",
        setup=["module load apptainer"],
    ),
    # GPUs through --gpus without a type, Triton in a Podman container.
    "gpus_podman": dict(
        partition="gpu",
        gpus=1,
        gpu_request="gpus",
        container="podman",
        image="nvcr.io/nvidia/tritonserver:24.08-py3",
        container_options=["--shm-size=1g"],
    ),
    # Singularity with typed --gpus and Docker-style options.
    "singularity_gpus_typed": dict(
        gpus=4,
        gpu_type="h100",
        gpu_request="gpus",
        container="singularity",
        image="/images/triton.sif",
    ),
    # Docker on a CPU partition.
    "docker_cpu": dict(
        partition="short",
        time_limit="30",
        container="docker",
        image="nvcr.io/nvidia/tritonserver:24.08-py3",
    ),
}


def render(case: str, **spec_overrides) -> str:
    """Render the script of one golden case with fixed paths (no host specifics)."""
    settings = SlurmSettings(python=PY, state_dir=f"{SHARED}/state", **CASES[case])
    context = BackendContext(
        deployment="lab", state_dir=Path(SHARED), config_dir=Path("/etc/bioengine")
    )
    repo = Path(f"{SHARED}/repository")
    location = RepositoryLocation(uri=str(repo), local_path=repo)
    if case.endswith("podman") or case.startswith("docker"):
        location = RepositoryLocation(
            uri="s3://s3.cluster.local:9000/models/lab",
            env={"AWS_ACCESS_KEY_ID": "secret-id", "AWS_SECRET_ACCESS_KEY": "secret-key"},
        )
    spec = ReplicaSpec(
        deployment="lab",
        repository=location,
        models=["unet2d_nuclei_broad", "stardist"],
        labels={"bioengine.deployment": "lab"},
        env=dict(location.env),
        **spec_overrides,
    )
    return SlurmExecutor(settings, context).preview(spec)


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_script_matches_golden(case: str) -> None:
    """Each representative option set renders exactly the reviewed script."""
    text = render(case)
    path = GOLDEN / f"{case}.sh"
    if os.environ.get("BIOENGINE_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; set BIOENGINE_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text()


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_script_is_valid_bash_without_secrets(case: str) -> None:
    """The script parses as bash and never contains credential values (they go via sbatch env)."""
    text = render(case)
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    assert "secret-key" not in text and "secret-id" not in text
    assert text.startswith("#!/bin/bash\n")


def test_spec_gpus_override_settings() -> None:
    """A ReplicaSpec asking for GPUs gets them even where the site default is none."""
    assert "#SBATCH --gres=gpu:3\n" in render("minimal", gpus=3)


def test_operator_template_replaces_default(tmp_path: Path) -> None:
    """[executor] template points at the operator's own Jinja2 file."""
    template = tmp_path / "site.sh.j2"
    template.write_text(
        "#!/bin/bash\n#SBATCH --job-name={{ job_name }}\n#SBATCH --reservation=imaging\n"
        "exec {{ launch | join(' ') }}\n"
    )
    settings = SlurmSettings(python=PY, template=str(template))
    context = BackendContext(deployment="lab", state_dir=tmp_path, config_dir=tmp_path)
    spec = ReplicaSpec(deployment="lab", repository=RepositoryLocation(uri="/r"))
    text = SlurmExecutor(settings, context).preview(spec)
    assert text.startswith("#!/bin/bash\n#SBATCH --job-name=lab.1\n")
    assert "--reservation=imaging" in text and "bioengine_executor_slurm.launch" in text


def test_broken_template_is_a_config_error(tmp_path: Path) -> None:
    """A template with a syntax error or an unknown variable names the template."""
    template = tmp_path / "bad.sh.j2"
    template.write_text("#!/bin/bash\n{{ no_such_variable }}\n")
    settings = SlurmSettings(template=str(template))
    context = BackendContext(deployment="lab", state_dir=tmp_path, config_dir=tmp_path)
    spec = ReplicaSpec(deployment="lab", repository=RepositoryLocation(uri="/r"))
    with pytest.raises(ConfigError, match="bad.sh.j2"):
        SlurmExecutor(settings, context).preview(spec)


@pytest.mark.parametrize(
    "values, key",
    [
        ({"time_limit": "two hours"}, "time_limit"),
        ({"memory": "lots"}, "memory"),
        ({"container": "podman"}, "image"),
        ({"setup": ["a\nb"]}, "setup"),
        ({"cpus": 0}, "cpus"),
        ({"partiton": "gpu"}, "partiton"),
    ],
)
def test_bad_settings_are_rejected(values: dict, key: str) -> None:
    """Invalid values and unknown keys fail validation, naming the key."""
    with pytest.raises(ValidationError, match=key):
        SlurmSettings(**values)


def test_config_file_errors_name_the_key(tmp_path: Path) -> None:
    """A bad value in site.toml is reported with file, section and key."""
    config = tmp_path / "site.toml"
    config.write_text('[executor]\nkind = "slurm"\ntime_limit = "soon"\n')
    with pytest.raises(ConfigError, match=r"\[executor\] key 'time_limit'"):
        load_config(config)


def test_cli_prints_the_script(tmp_path: Path) -> None:
    """`bioengine slurm script --config FILE` prints what the executor would submit."""
    config = tmp_path / "site.toml"
    config.write_text(
        f'[engine]\nname = "lab"\nstate_dir = "{tmp_path}/state"\n'
        f'[executor]\nkind = "slurm"\npartition = "gpu"\ngpus = 1\npython = "{PY}"\n'
        f'[storage]\nkind = "local"\npath = "{tmp_path}/repo"\n'
        '[[models]]\nsource = "folder:./m"\nid = "unet"\n'
    )
    bioengine = Path(sys.executable).parent / "bioengine"
    run = subprocess.run(
        [str(bioengine), "slurm", "script", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "#SBATCH --partition=gpu\n" in run.stdout
    assert "#SBATCH --gres=gpu:1\n" in run.stdout
    assert f"--repository {tmp_path}/repo" in run.stdout
    assert "--model unet" in run.stdout
    bad = subprocess.run(
        [str(bioengine), "slurm", "script", "--config", str(tmp_path / "missing.toml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "no such config file" in bad.stderr


def test_job_names_fit_squeues_name_column() -> None:
    """SHORT.N: 5 characters of the deployment (or `job_name`) and the slot; plain squeue shows
    8 characters, so deployments and replicas stay apart; the legacy prefix still works."""
    from bioengine_executor_slurm.script import job_name, names_deployment, slot_of

    default = SlurmSettings()
    assert job_name(default, "bioengine", 2) == "bioen.2"
    assert job_name(default, "lab", 1) == "lab.1" and slot_of("lab.12") == 12
    assert len(job_name(default, "imaging-production", 99)) <= 8
    assert names_deployment(default, "imaging-production", "imagi.3")
    assert not names_deployment(default, "lab", "lab.x") and slot_of("bioengine") is None
    assert job_name(SlurmSettings(job_name="img"), "imaging", 1) == "img.1"
    legacy = SlurmSettings(job_name_prefix="bioengine")
    assert job_name(legacy, "lab", 3) == "bioengine-lab"
    assert names_deployment(legacy, "lab", "bioengine-lab")
    with pytest.raises(ValidationError, match="job_name"):
        SlurmSettings(job_name="toolong")


def test_comment_round_trips_labels() -> None:
    """Labels survive the job comment, including characters Slurm options cannot hold."""
    labels = {"bioengine.deployment": "lab", "team": "a b,c=d"}
    comment = job_comment("lab", labels)
    assert " " not in comment and comment.startswith("bioengine:")
    assert parse_comment(comment) == labels
    assert parse_comment("somebody else's comment") is None


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("UNLIMITED", None),
        ("5", 300.0),
        ("1:30", 90.0),
        ("2:00:00", 7200.0),
        ("1-00:00:00", 86400.0),
        ("2-12", 216000.0),
    ],
)
def test_parse_duration(text: str, seconds: float | None) -> None:
    """Slurm's duration formats, as squeue prints time limits."""
    assert parse_duration(text) == seconds


def test_parse_squeue_text_and_newer_json_layout() -> None:
    """The text fallback and the number-object JSON layout of newer Slurm parse alike."""
    line = "\x1f".join(
        [
            "42",
            "bioengine-lab",
            "RUNNING",
            "alice",
            "None",
            "bioengine:bioengine.deployment=lab",
            "gpu",
            "node7",
            "2026-01-01T10:00:00",
            "2026-01-01T12:00:00",
            "2:00:00",
        ]
    )
    job = job_from_text(line)
    assert job is not None and job.job_id == "42" and job.state == "RUNNING"
    assert job.expires_at == job.start_time + 7200
    newer = job_from_json(
        {
            "job_id": 42,
            "name": "bioengine-lab",
            "job_state": ["PENDING"],
            "state_reason": "Resources",
            "time_limit": {"set": True, "infinite": False, "number": 120},
            "start_time": {"set": True, "number": 0},
            "user_name": "alice",
        }
    )
    assert newer.state == "PENDING" and newer.time_limit_s == 7200.0 and newer.start_time is None


def test_every_setting_is_documented() -> None:
    """docs/slurm.md's settings table lists every key of [executor] kind = "slurm"."""
    docs = (Path(__file__).resolve().parents[3] / "docs" / "slurm.md").read_text()
    missing = [
        name for name in SlurmSettings.model_fields if name != "kind" if f"| `{name}` |" not in docs
    ]
    assert missing == [], f"settings missing from docs/slurm.md: {missing}"


def test_submission_env_drops_an_enclosing_jobs_variables() -> None:
    """serve running inside a Slurm job does not leak that job's SLURM_* into replica jobs."""
    from bioengine_executor_slurm.slurm import submission_env

    env = submission_env(
        {
            "SLURM_JOB_ID": "7",
            "SLURM_CPUS_PER_TASK": "2",
            "SLURM_CONF": "/etc/x.conf",
            "SBATCH_ACCOUNT": "lab",
            "PATH": "/bin",
        }
    )
    assert env == {"SLURM_CONF": "/etc/x.conf", "SBATCH_ACCOUNT": "lab", "PATH": "/bin"}


def test_prune_removes_only_old_bookkeeping(tmp_path: Path) -> None:
    """Old stop markers, exit records and script copies go; job output and new files stay."""
    from bioengine_executor_slurm.script import ScriptPaths

    paths = ScriptPaths(tmp_path)
    paths.ensure()
    (tmp_path / "scripts").mkdir()
    old = [paths.stopped / "1", paths.endpoints / "1.exit.json", tmp_path / "scripts" / "1.sh"]
    keep = [paths.logs / "bioengine-x-1.out", paths.stopped / "2", paths.endpoints / "2.json"]
    for path in old + keep:
        path.write_text("x")
    for path in old + [keep[0]]:
        os.utime(path, (0, 0))
    assert paths.prune(max_age_days=30) == 3
    assert [p.exists() for p in old] == [False] * 3 and all(p.exists() for p in keep)
