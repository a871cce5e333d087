"""Which variables reach a replica job and its Triton: an allow-list, never serve's secrets.

The cluster test reads /proc/PID/environ of the job's launcher, tritonserver and its python
backend stubs on the real single-node cluster (.ci/start-slurm.sh); the others check the
environments that sbatch, the Slurm commands and the launcher build.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import psutil
import pytest
from bioengine_executor_slurm import SlurmSettings
from bioengine_executor_slurm.launch import build_command, parse_args
from bioengine_executor_slurm.script import ScriptPaths, launch_command
from bioengine_executor_slurm.slurm import SlurmCLI, job_environment
from pydantic import ValidationError

from bioengine_core.contracts import ReplicaSpec, ReplicaState, RepositoryLocation
from bioengine_core.testing.environ import ENGINE_SECRETS, environ_of

SECRET_VALUES = tuple(ENGINE_SECRETS.values())


def test_sbatch_environment_is_an_allow_list(engine_secrets) -> None:
    """sbatch (whose environment the job gets) keeps what a job needs and the replica's own
    variables; serve's secrets and an enclosing job's SLURM_* stay behind."""
    environ = {
        **engine_secrets,
        "PATH": "/usr/bin:/bin",
        "HOME": "/home/svc",
        "LANG": "C.UTF-8",
        "SLURM_CONF": "/etc/slurm/x.conf",
        "SLURM_JOB_ID": "7",
        "SBATCH_ACCOUNT": "lab",
        "MODULEPATH": "/etc/modulefiles",
        "BASH_FUNC_module%%": "() {  eval $(/usr/bin/modulecmd bash $*)\n}",
        "XDG_RUNTIME_DIR": "/run/user/1000",
        "CUDA_MODULE_LOADING": "LAZY",
        "SITE_VAR": "site",
        "OTHER": "x",
    }
    env = job_environment(environ, {"AWS_ACCESS_KEY_ID": "repo-key-id"}, allow=("SITE_*",))
    assert env == {
        "PATH": "/usr/bin:/bin",
        "HOME": "/home/svc",
        "LANG": "C.UTF-8",
        "SLURM_CONF": "/etc/slurm/x.conf",
        "SBATCH_ACCOUNT": "lab",
        "MODULEPATH": "/etc/modulefiles",
        "BASH_FUNC_module%%": environ["BASH_FUNC_module%%"],
        "XDG_RUNTIME_DIR": "/run/user/1000",
        "CUDA_MODULE_LOADING": "LAZY",
        "SITE_VAR": "site",
        "AWS_ACCESS_KEY_ID": "repo-key-id",
    }


def test_slurm_commands_get_no_secrets(engine_secrets, monkeypatch) -> None:
    """squeue/scancel/... run with the base allow-list and SLURM_CONF, without SQUEUE_* defaults."""
    monkeypatch.setenv("SLURM_CONF", "/etc/slurm/x.conf")
    monkeypatch.setenv("SQUEUE_FORMAT", "%i")
    out = SlurmCLI(retries=0).run(["env"])
    assert "SLURM_CONF=/etc/slurm/x.conf" in out and f"PATH={os.environ['PATH']}" in out
    assert "SQUEUE_FORMAT" not in out
    for value in SECRET_VALUES:
        assert value not in out


def fake_triton(tmp_path: Path) -> str:
    path = tmp_path / "tritonserver"
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def job_env(engine_secrets, monkeypatch) -> dict[str, str]:
    """A job's environment: the replica's variables, one set by `setup`, one nobody named."""
    extra = {
        "AWS_ACCESS_KEY_ID": "repo-key-id",
        "MY_SETUP_VAR": "from-setup",
        "UNNAMED_VAR": "job-only",
        "CUDA_HOME": "/opt/cuda",
        "XDG_RUNTIME_DIR": "/run/user/1000",
    }
    for key, value in extra.items():
        monkeypatch.setenv(key, value)
    return extra


LAUNCH = ["--endpoint-dir", "/tmp/e", "--repository", "/r"]
PASS = ["--pass-env", "AWS_ACCESS_KEY_ID", "--pass-env", "MY_*"]


def test_launcher_gives_triton_only_named_variables(job_env, tmp_path) -> None:
    """container = none: tritonserver gets the base set, CUDA_*, and the `--pass-env` names and
    patterns of the job; neither serve's secrets nor unnamed job variables."""
    args = parse_args([*LAUNCH, "--triton-binary", fake_triton(tmp_path), *PASS])
    _, env = build_command(args, [1, 2, 3])
    assert env["AWS_ACCESS_KEY_ID"] == "repo-key-id" and env["MY_SETUP_VAR"] == "from-setup"
    assert env["CUDA_HOME"] == "/opt/cuda" and env["PATH"] == os.environ["PATH"]
    assert "UNNAMED_VAR" not in env and "XDG_RUNTIME_DIR" not in env
    for value in SECRET_VALUES:
        assert value not in env.values()


def test_launcher_podman_passes_named_variables_by_name(job_env) -> None:
    """podman: `--env NAME` for each passed variable (value from the client's environment),
    `--http-proxy=false`; the client keeps its runtime settings but no secret."""
    args = parse_args([*LAUNCH, "--container", "podman", "--image", "img", *PASS])
    cmd, env = build_command(args, [1, 2, 3])
    image = cmd.index("img")
    assert "--http-proxy=false" in cmd[:image]
    envs = [cmd[i + 1] for i in range(image) if cmd[i] == "--env"]
    assert envs == ["AWS_ACCESS_KEY_ID", "MY_SETUP_VAR"]
    assert env["AWS_ACCESS_KEY_ID"] == "repo-key-id" and env["XDG_RUNTIME_DIR"] == "/run/user/1000"
    assert "UNNAMED_VAR" not in env
    for value in SECRET_VALUES:
        assert value not in env.values()


def test_launcher_apptainer_passes_named_variables_prefixed(job_env) -> None:
    """apptainer: `--cleanenv`, passed variables only as APPTAINERENV_/SINGULARITYENV_."""
    args = parse_args([*LAUNCH, "--container", "apptainer", "--image", "t.sif", *PASS])
    cmd, env = build_command(args, [1, 2, 3])
    assert cmd[:3] == ["apptainer", "exec", "--cleanenv"]
    assert env["APPTAINERENV_AWS_ACCESS_KEY_ID"] == "repo-key-id"
    assert env["SINGULARITYENV_MY_SETUP_VAR"] == "from-setup"
    assert "AWS_ACCESS_KEY_ID" not in env and "UNNAMED_VAR" not in env
    for value in SECRET_VALUES:
        assert value not in env.values()


def test_script_names_replica_variables_for_every_runtime() -> None:
    """The launcher is told which variables to pass (names only, never values), with or without
    a container; `pass_env` patterns are added."""
    repo = RepositoryLocation(uri="s3://h:9000/b", env={"AWS_ACCESS_KEY_ID": "repo-key-id"})
    spec = ReplicaSpec(deployment="lab", repository=repo)
    settings = SlurmSettings(python="/py", env={"HF_HOME": "/scratch/hf"}, pass_env=["MY_*"])
    lines = launch_command(settings, spec, ScriptPaths(Path("/s")), 0)
    passed = [line for line in lines if line.startswith("--pass-env")]
    assert passed == [
        "--pass-env AWS_ACCESS_KEY_ID",
        "--pass-env HF_HOME",
        "--pass-env 'MY_*'",
    ]
    assert "repo-key-id" not in " ".join(lines)


@pytest.mark.parametrize("bad", ["", "A=B", "A,B", "A B"])
def test_pass_env_rejects_what_is_not_a_name(bad: str) -> None:
    """`pass_env` entries are names or patterns: no values, lists or spaces."""
    with pytest.raises(ValidationError):
        SlurmSettings(pass_env=[bad])


@pytest.mark.slurm
@pytest.mark.triton
def test_real_job_and_triton_get_no_engine_secrets(
    slurm_cluster, make_executor, spec, identity_model, engine_secrets, check_replica_environ
) -> None:
    """A real job: its launcher (the job's environment), tritonserver and the python backend
    stubs carry none of the submitter's secrets; the repository's variables, `env` and the
    `pass_env` variable a `setup` line exported reach Triton, an unnamed one does not."""
    spec.repository.env = {"AWS_ACCESS_KEY_ID": "repo-key-id"}
    executor = make_executor(
        env={"BIOENGINE_TEST_CFG": "from-config"},
        pass_env=["BIOENGINE_TEST_SETUP*"],
        setup=[
            "export BIOENGINE_TEST_SETUP=from-setup",
            "export BIOENGINE_UNNAMED=job-only",
        ],
    )
    status = executor.start(spec)
    deadline = time.monotonic() + 120
    current = executor.status(status.replica_id)
    while current.state is not ReplicaState.READY and time.monotonic() < deadline:
        assert current.state.alive, f"{current.message}\n{executor.logs(status.replica_id)}"
        time.sleep(0.3)
        current = executor.status(status.replica_id)
    try:
        assert current.state is ReplicaState.READY, executor.logs(status.replica_id)
        endpoint = executor._endpoint(status.replica_id)
        expected = {
            "AWS_ACCESS_KEY_ID": "repo-key-id",
            "BIOENGINE_TEST_CFG": "from-config",
            "BIOENGINE_TEST_SETUP": "from-setup",
        }
        processes = check_replica_environ(endpoint["pid"], engine_secrets, expected)
        for proc in processes:
            assert "BIOENGINE_UNNAMED" not in environ_of(proc.pid)[1], proc
        launcher = psutil.Process(endpoint["pid"]).parent()
        assert "bioengine_executor_slurm.launch" in " ".join(launcher.cmdline())
        raw, job = environ_of(launcher.pid)  # the job's environment (after `setup`)
        for name, value in engine_secrets.items():
            assert value.encode() not in raw, f"{name} reached the job"
        assert job["AWS_ACCESS_KEY_ID"] == "repo-key-id" and job["SLURM_JOB_ID"]
        assert job["BIOENGINE_UNNAMED"] == "job-only"
    finally:
        executor.stop(status.replica_id, grace=10)
