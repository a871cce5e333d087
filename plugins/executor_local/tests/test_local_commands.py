"""Rendered container command lines for every engine (docker, podman, apptainer, singularity)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from bioengine_executor_local import (
    ApptainerExecutor,
    ContainerExecutor,
    LocalExecutorSettings,
    apptainer_command,
    container_run_command,
)
from bioengine_executor_local.plugin import make_executor

from bioengine_core.contracts import ReplicaSpec, RepositoryLocation
from bioengine_core.errors import ExecutorError

PORTS = {"http": 41000, "grpc": 41001, "metrics": 41002}
TRITON_TAIL = [
    "--model-control-mode=explicit",
    "--exit-on-error=false",
    "--log-info=true",
    "--load-model=unet",
    "--exit-timeout-secs=3",
]


def spec(gpus: int = 0, s3: bool = False) -> ReplicaSpec:
    """A spec with one model, a label, an env var and (unless s3) a local repository."""
    repo = (
        RepositoryLocation("s3://127.0.0.1:9000/models/x", env={"AWS_SECRET_ACCESS_KEY": "s3cr3t"})
        if s3
        else RepositoryLocation("/srv/repo", local_path=Path("/srv/repo"))
    )
    return ReplicaSpec(
        deployment="lab",
        repository=repo,
        models=["unet"],
        labels={"team": "imaging"},
        env={"OMP_NUM_THREADS": "2"},
        gpus=gpus,
    )


def settings(engine: str, **kw) -> LocalExecutorSettings:
    """Container-mode settings for `engine` with a fixed image."""
    return LocalExecutorSettings(mode="container", container_engine=engine, image="triton:1", **kw)


def test_docker_run_command():
    """docker: detached, named, labelled, ports published on 127.0.0.1, repository read-only."""
    argv, env = container_run_command(settings("docker"), spec(), "lab-1", PORTS)
    assert argv == [
        "docker", "run", "--detach", "--name", "bioengine-lab-1",
        "--label", "bioengine.deployment=lab",
        "--label", "bioengine.replica=lab-1",
        "--label", "bioengine.url=http://127.0.0.1:41000",
        "--label", "team=imaging",
        "--publish", "127.0.0.1:41000:8000",
        "--publish", "127.0.0.1:41001:8001",
        "--publish", "127.0.0.1:41002:8002",
        "--volume", "/srv/repo:/models:ro",
        "--env", "OMP_NUM_THREADS=2",
        "triton:1",
        "tritonserver", "--model-repository=/models",
        "--http-address=0.0.0.0", "--http-port=8000",
        "--grpc-address=0.0.0.0", "--grpc-port=8001",
        "--metrics-address=0.0.0.0", "--metrics-port=8002",
        *TRITON_TAIL,
    ]  # fmt: skip
    assert env == {}  # nothing secret: the client runs with client_env() alone


@pytest.mark.parametrize(
    ("gpus", "count", "flags"),
    [
        (None, 0, []),
        (None, 2, ["--gpus", "2"]),
        ("all", 0, ["--gpus", "all"]),
        ("0,2", 1, ["--gpus", '"device=0,2"']),
    ],
)
def test_docker_gpu_flags(gpus, count, flags):
    """docker: `--gpus` with a count, `all`, or a quoted device list."""
    argv, _ = container_run_command(settings("docker", gpus=gpus), spec(count), "r", PORTS)
    image = argv.index("triton:1")
    start = argv.index("OMP_NUM_THREADS=2") + 1
    assert argv[start:image] == flags


@pytest.mark.parametrize(
    ("gpus", "count", "flags"),
    [
        (None, 0, []),
        (None, 2, ["--device", "nvidia.com/gpu=0", "--device", "nvidia.com/gpu=1"]),
        ("all", 0, ["--device", "nvidia.com/gpu=all"]),
        ("3", 1, ["--device", "nvidia.com/gpu=3"]),
    ],
)
def test_podman_cdi_gpu_flags(gpus, count, flags):
    """podman: no proxy variables copied in, CDI devices `nvidia.com/gpu=...`, the operator's
    options, then the image."""
    opts = ["--runtime", "runc"]
    argv, _ = container_run_command(
        settings("podman", gpus=gpus, container_options=opts), spec(count), "r", PORTS
    )
    assert argv[:5] == ["podman", "run", "--detach", "--name", "bioengine-r"]
    image = argv.index("triton:1")
    start = argv.index("OMP_NUM_THREADS=2") + 1
    assert argv[start:image] == ["--http-proxy=false"] + flags + opts


def test_s3_repository_is_passed_by_uri_and_secrets_stay_off_the_command_line():
    """Without a local directory there is no bind mount; credentials travel as `--env NAME`."""
    argv, env = container_run_command(settings("podman"), spec(s3=True), "r", PORTS)
    assert "--volume" not in argv
    assert "--model-repository=s3://127.0.0.1:9000/models/x" in argv
    assert "s3cr3t" not in " ".join(argv)
    assert argv[argv.index("AWS_SECRET_ACCESS_KEY") - 1] == "--env"
    assert env == {"AWS_SECRET_ACCESS_KEY": "s3cr3t"}


def test_apptainer_command():
    """apptainer: exec with a clean env, --nv, read-only bind, host ports, env as APPTAINERENV_."""
    cfg = settings(
        "apptainer", gpus="1", address="127.0.0.1", container_options=["--writable-tmpfs"]
    )
    argv, env = apptainer_command(cfg, spec(1), PORTS)
    assert argv == [
        "apptainer", "exec", "--cleanenv", "--nv",
        "--bind", "/srv/repo:/models:ro",
        "--writable-tmpfs",
        "triton:1",
        "tritonserver", "--model-repository=/models",
        "--http-address=127.0.0.1", "--http-port=41000",
        "--grpc-address=127.0.0.1", "--grpc-port=41001",
        "--metrics-address=127.0.0.1", "--metrics-port=41002",
        *TRITON_TAIL,
    ]  # fmt: skip
    assert env == {"APPTAINERENV_OMP_NUM_THREADS": "2", "APPTAINERENV_CUDA_VISIBLE_DEVICES": "1"}


def test_singularity_command_without_gpus():
    """singularity: the same layout, SINGULARITYENV_ variables, no --nv without GPUs."""
    argv, env = apptainer_command(settings("singularity"), spec(0), PORTS)
    assert argv[:4] == ["singularity", "exec", "--cleanenv", "--bind"]
    assert "--nv" not in argv
    assert env == {"SINGULARITYENV_OMP_NUM_THREADS": "2"}


def test_triton_args_and_custom_binary_are_rendered():
    """Extra tritonserver arguments and the in-container binary path appear after the image."""
    cfg = settings(
        "docker", container_triton="/opt/tritonserver/bin/tritonserver", triton_args=["--strict"]
    )
    argv, _ = container_run_command(cfg, spec(), "r", PORTS)
    after = argv[argv.index("triton:1") + 1 :]
    assert after[0] == "/opt/tritonserver/bin/tritonserver"
    assert after[-1] == "--strict"


def test_factory_picks_executor_by_engine(context):
    """mode = container selects ContainerExecutor (docker/podman) or ApptainerExecutor."""
    for engine, cls in [
        ("docker", ContainerExecutor),
        ("podman", ContainerExecutor),
        ("apptainer", ApptainerExecutor),
        ("singularity", ApptainerExecutor),
    ]:
        assert isinstance(make_executor(settings=settings(engine), context=context), cls)
    with pytest.raises(ExecutorError):
        apptainer_command(settings("docker"), spec(), PORTS)


def test_previews_render_the_container_command(context):
    """preview() of container executors shows the engine command and names the image."""
    docker = make_executor(settings=settings("docker"), context=context).preview(spec())
    assert "docker run --detach --name bioengine-REPLICA_ID" in docker
    assert "--volume /srv/repo:/models:ro" in docker
    apptainer = make_executor(settings=settings("apptainer"), context=context).preview(spec())
    assert "apptainer exec --cleanenv" in apptainer
    assert "APPTAINERENV_OMP_NUM_THREADS=2" in apptainer


def test_apptainer_preview_hides_repository_credentials(context):
    """The storage's credentials are masked in apptainer previews, under their prefixed name."""
    text = make_executor(settings=settings("apptainer"), context=context).preview(spec(s3=True))
    assert "s3cr3t" not in text
    assert "APPTAINERENV_AWS_SECRET_ACCESS_KEY=***" in text


def test_secret_looking_settings_env_is_passed_by_name():
    """A token in the operator's `env` is not written on the command line either."""
    argv, env = container_run_command(
        settings("docker", env={"HF_TOKEN": "t0k"}), spec(), "r", PORTS
    )
    assert "t0k" not in " ".join(argv) and argv[argv.index("HF_TOKEN") - 1] == "--env"
    assert env == {"HF_TOKEN": "t0k"}


def test_container_client_env_is_what_the_runtime_reads(engine_secrets, monkeypatch):
    """The docker/podman client keeps its socket, config and auth-file settings plus what it must
    copy into the container (`--env NAME`), and none of the engine's secrets."""
    from bioengine_executor_local.container import client_env

    runtime = {
        "DOCKER_HOST": "unix:///run/user/1000/docker.sock",
        "DOCKER_CONFIG": "/etc/bioengine/docker",
        "XDG_RUNTIME_DIR": "/run/user/1000",
        "CONTAINERS_CONF": "/etc/bioengine/containers.conf",
        "REGISTRY_AUTH_FILE": "/etc/bioengine/auth.json",
    }
    for key, value in runtime.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DOCKER_PASSWORD", "ci-registry-password")
    env = client_env({"AWS_SECRET_ACCESS_KEY": "repository-key"})
    assert runtime.items() <= env.items() and env["PATH"] == os.environ["PATH"]
    assert env["AWS_SECRET_ACCESS_KEY"] == "repository-key"  # the storage's, passed by name
    assert "BIOENGINE_ADMIN_TOKEN" not in env and "HYPHA_ADMIN_SECRET" not in env
    assert "DOCKER_PASSWORD" not in env
