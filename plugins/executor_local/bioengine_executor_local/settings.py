"""`[executor] kind = "local"`: how Triton replicas run on this host."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from bioengine_core.contracts import BackendSettings
from bioengine_core.util import parse_port_range

_GPUS = re.compile(r"^(all|\d+(,\d+)*)$")


class LocalExecutorSettings(BackendSettings):
    """`[executor] kind = "local"`: each replica is a tritonserver process or container here."""

    kind: Literal["local"] = "local"
    mode: Literal["process", "container"] = Field(
        "process",
        description="`process`: run the tritonserver binary directly; `container`: run it in a "
        "container with `container_engine`.",
    )

    # --- process mode
    triton_binary: str | None = Field(
        None,
        description="Path or name of `tritonserver` (process mode). Default: PATH, then the "
        "binary shipped in the nvidia-pytriton wheel (`bioengine-executor-local[triton]`).",
    )

    # --- container mode
    container_engine: Literal["docker", "podman", "apptainer", "singularity"] = Field(
        "docker", description="Container engine for mode = `container`."
    )
    image: str = Field(
        "nvcr.io/nvidia/tritonserver:24.10-py3",
        description="Container image with Triton (an image name for docker/podman, an image "
        "file or URI such as `docker://...` or `triton.sif` for apptainer/singularity).",
    )
    container_triton: str = Field(
        "tritonserver", description="The tritonserver command inside the container."
    )
    container_options: list[str] = Field(
        default_factory=list,
        description="Extra arguments for `docker run` / `podman run` / `apptainer exec`, e.g. "
        '`["--shm-size=1g"]` or for podman without crun `["--runtime", "runc"]`.',
    )
    container_backends: list[str] = Field(
        default_factory=lambda: ["python", "onnxruntime", "pytorch"],
        description="Triton backends the image has (the NVIDIA image has all three); the model "
        "repository builder uses native backends only when listed.",
    )

    # --- both modes
    gpus: str | None = Field(
        None,
        description="GPUs a replica may use: `all` or device ids `0,1`. Unset: as many as the "
        "engine asks for (none by default). Becomes CUDA_VISIBLE_DEVICES (process), `--gpus` "
        "(docker), CDI devices `nvidia.com/gpu=...` (podman) or `--nv` (apptainer).",
    )
    triton_args: list[str] = Field(
        default_factory=list,
        description="Extra tritonserver arguments, e.g. `--backend-config=python,shm-default-"
        "byte-size=16777216`.",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment variables for every replica. A replica inherits no "
        "other variable of the engine's environment except PATH, HOME, locale, TMPDIR, "
        "LD_LIBRARY_PATH and the CUDA/GPU ones.",
    )
    address: str = Field(
        "127.0.0.1",
        description="Host address replicas listen on (process mode) or publish their ports on "
        "(container mode). Keep 127.0.0.1 unless other hosts must reach replicas directly.",
    )
    port_range: str | None = Field(
        None,
        description="Ports replicas may use, e.g. `9100-9199` (each takes the lowest three free "
        "ones for HTTP, gRPC and metrics); default: any free port.",
    )
    start_timeout: float = Field(
        600.0,
        gt=0,
        description="Seconds a replica may take to become ready; after that it is stopped and "
        "reported failed (so the engine replaces it). Also bounds a container's image pull.",
    )
    stop_grace: float = Field(
        10.0,
        ge=0,
        description="Seconds between SIGTERM and SIGKILL when the engine does not say otherwise.",
    )
    exit_timeout: int = Field(
        3,
        ge=0,
        description="Seconds tritonserver waits after SIGTERM for in-flight requests and open "
        "client connections (`--exit-timeout-secs`). The router keeps connections open, so "
        "Triton always waits this long: keep it below `stop_grace`.",
    )
    log_dir: str | None = Field(
        None, description="Directory for per-replica log files (default: STATE_DIR/local/logs)."
    )

    def server_args(self) -> list[str]:
        """Extra tritonserver arguments: the exit timeout (unless given) and `triton_args`."""
        given = any(a.startswith("--exit-timeout-secs") for a in self.triton_args)
        own = [] if given else [f"--exit-timeout-secs={self.exit_timeout}"]
        return own + list(self.triton_args)

    @field_validator("port_range")
    @classmethod
    def _port_range(cls, value: str | None) -> str | None:
        if value is not None:
            parse_port_range(value)
        return value

    def ports_within(self) -> range | None:
        """The configured port range, or None for any free port."""
        return parse_port_range(self.port_range) if self.port_range else None

    @field_validator("gpus")
    @classmethod
    def _check_gpus(cls, value: str | None) -> str | None:
        if value is not None and not _GPUS.fullmatch(value.replace(" ", "")):
            raise ValueError("must be `all` or comma-separated device ids such as `0,1`")
        return value.replace(" ", "") if value else value

    @model_validator(mode="after")
    def _check_mode(self) -> LocalExecutorSettings:
        if self.mode == "container" and self.triton_binary:
            raise ValueError("triton_binary applies to mode = 'process'; use container_triton")
        return self
