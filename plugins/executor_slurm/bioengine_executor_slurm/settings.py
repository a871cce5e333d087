"""`[executor] kind = "slurm"`: how each Triton replica is submitted as a batch job."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from bioengine_core.contracts import BackendSettings
from bioengine_core.util import parse_port_range

_TIME = re.compile(r"^(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+(:\d{1,2}(:\d{1,2})?)?)$")
_MEMORY = re.compile(r"^\d+[KMGT]?$", re.I)


class SlurmSettings(BackendSettings):
    """`[executor] kind = "slurm"`: every replica is one Slurm batch job running Triton."""

    kind: Literal["slurm"] = "slurm"

    # --- resources (each becomes one #SBATCH line when set)
    partition: str | None = Field(
        None, description="Partition (`--partition`); site default if unset."
    )
    account: str | None = Field(None, description="Account to charge (`--account`).")
    qos: str | None = Field(None, description="Quality of service (`--qos`).")
    time_limit: str = Field(
        "24:00:00",
        description="Job time limit in Slurm's format (`MM`, `HH:MM:SS`, `D-HH:MM:SS`). A "
        "successor job is started before a job reaches it.",
    )
    cpus: int = Field(
        2,
        ge=1,
        description="CPUs for Triton (`--cpus-per-task`). The default 2 fits the smallest "
        "nodes; raise it for busy models (`config check` compares it with the partition's "
        "nodes).",
    )
    memory: str | None = Field(
        None, description="Memory per node (`--mem`, e.g. `16G`); site default if unset."
    )
    gpus: int = Field(0, ge=0, description="GPUs per replica (0: CPU only).")
    gpu_type: str | None = Field(None, description="GPU type, e.g. `a100` (`gpu:a100:N`).")
    gpu_request: Literal["gres", "gpus"] = Field(
        "gres", description="How GPUs are requested: `--gres=gpu[:type]:N` or `--gpus=[type:]N`."
    )
    constraint: str | None = Field(None, description="Node features (`--constraint`).")
    extra_sbatch: list[str] = Field(
        default_factory=list,
        description="More #SBATCH options, one per entry (`--exclusive`, `#SBATCH --mail-type=END`).",
    )
    setup: list[str] = Field(
        default_factory=list,
        description="Shell lines run before Triton starts (`module load cuda/12`, `export X=1`); "
        "a variable they export reaches Triton when `pass_env` names it.",
    )

    # --- what runs in the job
    container: Literal["none", "apptainer", "singularity", "podman", "docker"] = Field(
        "none",
        description="Run tritonserver directly (`none`) or inside a container with this runtime.",
    )
    image: str | None = Field(
        None,
        description="Container image (a .sif file for apptainer/singularity, an image name for "
        "podman/docker); required unless container = 'none'.",
    )
    container_triton: str = Field(
        "tritonserver",
        description="The tritonserver command inside the container (a path if not on its PATH).",
    )
    container_backends: list[str] = Field(
        default_factory=lambda: ["onnxruntime", "python", "pytorch", "tensorrt"],
        description="Triton backends the image has (NVIDIA's images: onnxruntime, python, "
        "pytorch, tensorrt); the repository builder uses native backends only when listed.",
    )
    container_options: list[str] = Field(
        default_factory=list, description="Extra arguments for the container runtime's run/exec."
    )
    python: str | None = Field(
        None,
        description="Python on the compute nodes that has bioengine-executor-slurm installed "
        "(default: the interpreter running `bioengine serve`, on a shared filesystem).",
    )
    triton_binary: str | None = Field(
        None, description="tritonserver on the compute nodes (container = 'none'; default: found)."
    )
    triton_args: list[str] = Field(
        default_factory=list, description="Extra tritonserver arguments."
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment variables for every replica (passed in sbatch's "
        "environment, never written into the batch script).",
    )
    pass_env: list[str] = Field(
        default_factory=list,
        description="Names or patterns (`MY_*`) of further variables that reach a replica: "
        "from `serve`'s environment into the job, and from the job (e.g. set by `setup` "
        "lines or modules) into tritonserver. Others are not passed on.",
    )
    exit_timeout: int = Field(
        3,
        ge=0,
        description="tritonserver `--exit-timeout-secs`: how long Triton waits after SIGTERM for "
        "in-flight requests and open connections (the router keeps connections open); keep it "
        "below the stop grace and the cluster's KillWait.",
    )
    bind_address: str = Field(
        "0.0.0.0", description="Address Triton listens on, on the compute node."
    )
    port_range: str | None = Field(
        None,
        description="Ports Triton may use on the compute node, e.g. `9100-9199` (HTTP, gRPC "
        "and metrics take the lowest free ones), for nodes whose firewall opens only a range.",
    )
    advertise_host: str | None = Field(
        None,
        description="Host name or address the engine uses to reach a replica (default: the "
        "compute node's host name, as the node reports it).",
    )

    # --- the engine's side
    state_dir: str | None = Field(
        None,
        description="Directory for endpoint files, job scripts and job output; must be on a "
        "filesystem shared by this host and the compute nodes (default: STATE_DIR/slurm).",
    )
    template: str | None = Field(
        None,
        description="Your own batch-script template (Jinja2); default: the one shipped with the "
        "plugin (`bioengine slurm template` prints it).",
    )
    job_name: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-]{1,5}$",
        description="Short name of this deployment's jobs (1-5 characters; default: the first 5 "
        "characters of [engine] name). Jobs are named SHORT.N (N: the replica's slot, 1, 2, ...) "
        "so plain `squeue`'s 8-character name column tells deployments and replicas apart; the "
        "full deployment name is in the job's comment.",
    )
    job_name_prefix: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Deprecated: name jobs PREFIX-DEPLOYMENT as releases before 0.2 did (set it "
        "to 'bioengine' while jobs started by such a release still run, so they are adopted); "
        "overrides `job_name`.",
    )
    ready_timeout: float = Field(
        600.0, gt=0, description="Seconds a started job may take for Triton to answer ready."
    )
    poll_interval: float = Field(
        5.0, gt=0, description="Seconds a squeue answer is reused (one squeue for all replicas)."
    )
    squeue_format: Literal["auto", "json", "text"] = Field(
        "auto", description="Read squeue as `--json` or as text (`auto`: JSON, else text)."
    )
    sacct: Literal["auto", "yes", "no"] = Field(
        "auto",
        description="Ask sacct about jobs the controller forgot (`auto`: if accounting is on).",
    )
    command_retries: int = Field(
        3, ge=0, description="Retries of Slurm commands on transient controller errors."
    )
    command_timeout: float = Field(30.0, gt=0, description="Seconds before a Slurm command fails.")

    @field_validator("port_range")
    @classmethod
    def _port_range(cls, value: str | None) -> str | None:
        if value is not None:
            parse_port_range(value)
        return value

    @field_validator("time_limit")
    @classmethod
    def _time(cls, value: str) -> str:
        value = str(value).strip()
        if not _TIME.fullmatch(value):
            raise ValueError("expected a Slurm time such as 60, 2:00:00 or 1-00:00:00")
        return value

    @field_validator("memory")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value is not None and not _MEMORY.fullmatch(value.strip()):
            raise ValueError("expected a Slurm memory size such as 16000, 16G or 512M")
        return value.strip() if value else value

    @field_validator("extra_sbatch", "setup")
    @classmethod
    def _lines(cls, value: list[str]) -> list[str]:
        for line in value:
            if "\n" in line:
                raise ValueError("one line per entry (no newlines)")
        return value

    @field_validator("pass_env")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        for name in value:
            if not name or any(c in name for c in "=, \t\n"):
                raise ValueError(f"{name!r}: expected a variable name or pattern such as MY_*")
        return value

    @model_validator(mode="after")
    def _container(self) -> SlurmSettings:
        if self.container != "none" and not self.image:
            raise ValueError(f"container = {self.container!r} needs `image`")
        return self
