"""Settings of the built-in HTTP gateway (KServe v2 / Triton HTTP protocol): where it listens,
who may call it, and the limits that keep one client from taking the service down."""

from __future__ import annotations

import ipaddress
import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .contracts import BackendContext, BackendSettings

ROLES = ("inference", "admin")


class TokenSettings(BaseModel):
    """One `[[gateways.http.tokens]]` entry: an API token (from the environment or a file)."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["inference", "admin"] = Field(
        description="inference: list models and run them; admin: also status details, "
        "metrics, load/unload models and scale."
    )
    env: str | None = Field(
        None,
        pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
        description="Name of the environment variable holding the token.",
    )
    file: str | None = Field(
        None, description="File holding the token (relative to the config's directory)."
    )
    name: str | None = Field(
        None, max_length=64, description="A label for logs (never the token itself)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> TokenSettings:
        if bool(self.env) == bool(self.file):
            raise ValueError("set exactly one of env or file")
        return self

    @property
    def label(self) -> str:
        """How logs name this token."""
        return self.name or (f"env:{self.env}" if self.env else f"file:{self.file}")


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class HttpGatewaySettings(BackendSettings):
    """`[gateways.http]`: where the KServe v2 HTTP endpoint listens, who may call it, limits."""

    kind: str = "http"
    tokens: list[TokenSettings] = Field(
        default_factory=list,
        description="API tokens; with any configured, every call except the health probes "
        "needs `Authorization: Bearer TOKEN`.",
    )
    allow_anonymous: bool = Field(
        False,
        description="Let callers without a token run models (role inference) on a "
        "non-loopback address; serve prints a warning.",
    )
    port: int = Field(9000, ge=0, le=65535, description="Port to bind (0: pick a free one).")
    tls_cert_file: str | None = Field(
        None, description="PEM certificate (chain) to serve HTTPS; needs tls_key_file."
    )
    tls_key_file: str | None = Field(None, description="PEM private key of tls_cert_file.")
    max_request_bytes: int = Field(
        256 << 20,
        ge=1024,
        description="Largest request body; larger ones get 413 before they are read.",
    )
    body_memory_budget: int = Field(
        1 << 30,
        ge=1024,
        description="Bytes of request bodies held in memory at once, over all requests; "
        "beyond it a request waits up to budget_wait seconds, then gets 503 with Retry-After.",
    )
    budget_wait: float = Field(
        5.0, ge=0, description="Seconds a request may wait for body memory before a 503."
    )
    header_timeout: float = Field(
        15.0,
        gt=0,
        description="Seconds a connection may take to send a request's headers (and may stay "
        "idle between requests).",
    )
    body_timeout: float = Field(
        120.0, gt=0, description="Seconds a client may take to send a request body (408 after)."
    )
    max_connections: int = Field(
        512, ge=1, description="Open client connections at most; more get 503 and are closed."
    )
    host: str = Field(
        "127.0.0.1",
        description="Address to bind; a non-loopback one needs tokens or allow_anonymous.",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        max_length=64,
        description="Web origins (`scheme://host[:port]`, exactly as a browser sends them) "
        "whose pages may call this gateway from a browser (CORS); none by default.",
    )

    @field_validator("cors_origins")
    @classmethod
    def _exact_origins(cls, origins: list[str]) -> list[str]:
        for origin in origins:
            check_origin(origin)
        return origins

    @field_validator("host")
    @classmethod
    def _exposed_needs_auth(cls, host: str, info) -> str:
        data = info.data
        if not is_loopback(host) and not data.get("tokens") and not data.get("allow_anonymous"):
            raise ValueError(
                f"binding to {host!r} exposes the service beyond this machine without "
                "authentication: add [[gateways.http.tokens]], or set allow_anonymous = true"
            )
        return host

    @model_validator(mode="after")
    def _tls_pair(self) -> HttpGatewaySettings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("set both tls_cert_file and tls_key_file, or neither")
        return self

    @property
    def exposed_anonymously(self) -> bool:
        """True when anyone on the network may call without a token (warned about at start)."""
        return not is_loopback(self.host) and self.allow_anonymous


_HOST_RE = re.compile(
    r"^(\[[0-9a-f:.]+\]|[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*)$"
)


def check_origin(origin: str) -> None:
    """Raise ValueError unless `origin` is one exact web origin: lower-case `http(s)://host`
    with an optional non-default port, no path, user, query or fragment, not `*` or `null`."""
    bad = f"{origin[:80]!r} is not an exact origin like 'https://lab.example.org[:port]'"
    if len(origin) > 253 or origin != origin.strip() or any(ord(c) < 33 for c in origin):
        raise ValueError(bad)
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        raise ValueError(bad) from None
    host = parts.netloc.rsplit(":", 1)[0] if port is not None else parts.netloc
    if (
        parts.scheme not in ("http", "https")
        or parts.path
        or parts.query
        or parts.fragment
        or "@" in parts.netloc
        or origin.endswith(("#", "?"))
        or not _HOST_RE.fullmatch(host)
        or origin != f"{parts.scheme}://{parts.netloc}"
        or (port is not None and port == {"http": 80, "https": 443}[parts.scheme])
        or parts.netloc.endswith(":")
    ):
        raise ValueError(bad)


def make_http_gateway(*, settings: HttpGatewaySettings, context: BackendContext):
    """Factory registered for `kind = "http"`."""
    from .gateway_http_app import HttpGateway

    return HttpGateway(settings, context)
