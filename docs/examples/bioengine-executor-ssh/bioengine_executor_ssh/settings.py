"""`[executor] kind = "ssh"`: where the remote host is and how Triton runs there."""

from typing import Literal

from pydantic import Field

from bioengine_core.contracts import BackendSettings


class SshSettings(BackendSettings):
    """Every replica is a `tritonserver` process started with nohup on one remote host."""

    kind: Literal["ssh"] = "ssh"
    host: str = Field(description="Host name or address of the remote machine.")
    user: str | None = Field(None, description="Login name (default: ssh's own default).")
    port: int = Field(22, ge=1, le=65535, description="sshd port on the remote host.")
    identity_file: str | None = Field(
        None, description="Private key to log in with (`ssh -i`); relative to the config file."
    )
    ssh_options: list[str] = Field(
        default_factory=list,
        description="Extra `ssh -o` options, e.g. `StrictHostKeyChecking=accept-new`.",
    )
    connect_timeout: int = Field(10, ge=1, description="Seconds ssh waits for a connection.")
    python: str = Field(
        "python3", description="Python 3 on the remote host (runs the stdlib-only launcher)."
    )
    tritonserver: str = Field(
        "tritonserver", description="The `tritonserver` binary on the remote host."
    )
    backend_directory: str | None = Field(
        None, description="Triton's `--backend-directory` on the remote host (default: Triton's)."
    )
    backends: list[str] = Field(
        default_factory=lambda: ["python"],
        description="Triton backends present on the remote host (`python`, `onnxruntime`, ...).",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment for the remote Triton, e.g. `LD_LIBRARY_PATH` of its libraries.",
    )
    state_dir: str = Field(
        "~/.bioengine-ssh",
        description="Remote directory for each replica's metadata and log (`~` is the login's home).",
    )
    bind_address: str = Field(
        "0.0.0.0", description="Address Triton listens on, on the remote host."
    )
