"""`[gateways.hypha]` settings: where the Hypha server is, who we are there, who may administer."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from bioengine_core.contracts import BackendContext, BackendSettings
from bioengine_core.errors import ConfigError

FORBIDDEN_SERVER_ARGS = ("--start-minio-server",)


class HyphaGatewaySettings(BackendSettings):
    """`[gateways.hypha]`: expose the service on a Hypha server (embedded or remote)."""

    kind: str = "hypha"
    server_url: str | None = Field(
        None,
        description="URL of an existing Hypha server to register on (proxy mode), "
        "e.g. https://hypha.aicell.io. Leave unset with `embedded = true`.",
    )
    embedded: bool = Field(
        False,
        description="Start a Hypha server as a managed child process (all-in-one mode); "
        "it is stopped with the gateway.",
    )
    host: str = Field("127.0.0.1", description="Address the embedded Hypha server binds.")
    port: int = Field(
        0, ge=0, le=65535, description="Port of the embedded Hypha server (0: a free one)."
    )
    public_url: str | None = Field(
        None,
        description="URL users reach the embedded server at (behind the operator's TLS proxy); "
        "passed to Hypha as --public-base-url and shown by `bioengine status`.",
    )
    server_args: list[str] = Field(
        default_factory=list,
        description="Extra command-line arguments for the embedded `python -m hypha.server`.",
    )
    startup_timeout: float = Field(
        180.0, gt=0, description="Seconds to wait for the embedded server (first start ~30 s)."
    )
    ws_compression: bool = Field(
        False,
        description="WebSocket per-message compression, for the embedded server and the "
        "gateway's own connection. Off by default: image tensors do not compress and deflate "
        "made array transfer ~10x slower.",
    )
    workspace: str | None = Field(
        None,
        pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$",
        description="Workspace to register in (default: `bioengine` when embedded, otherwise "
        "the token's own workspace). Created if the token may create it.",
    )
    service_id: str = Field(
        "bioengine",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Id of the `bioengine-model-runner` service.",
    )
    triton_service_id: str = Field(
        "triton-client",
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Id of the `triton-client` compatible service (existing BioEngine clients).",
    )
    client_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9_-]{1,64}$",
        description="Hypha client id of the gateway (default: `bioengine-<service_id>`).",
    )
    visibility: Literal["public", "protected"] = Field(
        "public",
        description="public: anyone may list and run models; protected: only members of the "
        "workspace. Administration always needs authorisation.",
    )
    token_env: str | None = Field(
        None, description="Name of the environment variable holding the Hypha token."
    )
    token_file: str | None = Field(
        None, description="File holding the Hypha token (relative to the config's directory)."
    )
    admin_users: list[str] = Field(
        default_factory=list,
        description="Hypha user ids or e-mail addresses allowed to load/unload models and scale.",
    )
    admin_token_env: str | None = Field(
        None,
        description="Name of the environment variable holding a shared admin secret; a caller "
        "passing it as `admin_token=` may load/unload models and scale.",
    )
    admin_token_file: str | None = Field(
        None, description="File holding the shared admin secret (alternative to admin_token_env)."
    )
    health_interval: float = Field(
        2.0, gt=0, description="Seconds between checks that the services are still registered."
    )
    reconnect_min_delay: float = Field(
        0.5, gt=0, description="First delay (s) before reconnecting; doubles on each failure."
    )
    reconnect_max_delay: float = Field(
        8.0, gt=0, description="Longest delay (s) between reconnection attempts."
    )
    connect_timeout: float = Field(
        20.0, gt=0, description="Seconds one connection attempt (connect + register) may take."
    )
    direct: bool = Field(
        True,
        description="Offer a direct HTTP path for large arrays: clients of "
        "`bioengine_gateway_hypha.client` send tensors there instead of through Hypha RPC.",
    )
    direct_host: str = Field("127.0.0.1", description="Address the direct HTTP path binds.")
    direct_port: int = Field(0, ge=0, le=65535, description="Port of the direct path (0: free).")
    direct_url: str | None = Field(
        None,
        description="URL clients use to reach the direct path (behind a proxy); default "
        "http://<direct_host>:<port>.",
    )
    direct_ticket_ttl: float = Field(
        900.0, gt=0, description="Seconds a direct-path ticket handed out by Hypha stays valid."
    )
    direct_max_request_bytes: int = Field(
        512 * 1024 * 1024,
        gt=0,
        description="Largest request body (bytes) on the direct path, and the most its .npz "
        "arrays may inflate to; larger requests get 413 before they are buffered.",
    )
    direct_read_timeout: float = Field(
        30.0, gt=0, description="Longest pause (s) while a direct-path request body arrives (408)."
    )
    direct_body_timeout: float = Field(
        300.0, gt=0, description="Seconds a whole direct-path request body may take to arrive."
    )
    rpc_max_input_bytes: int = Field(
        512 * 1024 * 1024,
        gt=0,
        description="Most bytes of input arrays one Hypha RPC `infer`/`execute` call may carry.",
    )

    @field_validator("server_args")
    @classmethod
    def _no_minio(cls, value: list[str]) -> list[str]:
        for arg in value:
            if arg.split("=", 1)[0] in FORBIDDEN_SERVER_ARGS:
                raise ValueError(f"{arg!r} is not allowed: it downloads and starts MinIO")
        return value

    @model_validator(mode="after")
    def _where(self) -> HyphaGatewaySettings:
        if self.embedded and self.server_url:
            raise ValueError("set either server_url (proxy mode) or embedded = true, not both")
        if not self.embedded and not self.server_url:
            raise ValueError("set server_url (proxy mode) or embedded = true (all-in-one)")
        if self.token_env and self.token_file:
            raise ValueError("set either token_env or token_file, not both")
        if self.admin_token_env and self.admin_token_file:
            raise ValueError("set either admin_token_env or admin_token_file, not both")
        if self.reconnect_max_delay < self.reconnect_min_delay:
            raise ValueError("reconnect_max_delay must be >= reconnect_min_delay")
        return self

    @property
    def effective_workspace(self) -> str | None:
        """The workspace to register in (None: the token's own)."""
        return self.workspace or ("bioengine" if self.embedded else None)

    @property
    def effective_client_id(self) -> str:
        """The Hypha client id of the gateway connection."""
        return self.client_id or f"bioengine-{self.service_id}"


def read_secret(
    env: str | None, file: str | None, what: str, context: BackendContext | None
) -> SecretStr | None:
    """Read a secret from the named environment variable or file; ConfigError if absent."""
    if env:
        value = os.environ.get(env)
        if not value:
            raise ConfigError(f"[gateways.hypha] {what}: environment variable {env} is not set")
        return SecretStr(value.strip())
    if file:
        path = context.resolve_path(file) if context else Path(file).expanduser()
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"[gateways.hypha] {what}: cannot read {path}: {exc}") from exc
        if not value:
            raise ConfigError(f"[gateways.hypha] {what}: {path} is empty")
        return SecretStr(value)
    return None
