"""Built-in HTTP gateway (KServe v2 / Triton HTTP protocol). Implementation in progress."""

from __future__ import annotations

from pydantic import Field

from .contracts import BackendContext, BackendSettings


class HttpGatewaySettings(BackendSettings):
    """`[gateways.http]`: where the KServe v2 HTTP endpoint listens."""

    kind: str = "http"
    host: str = Field("127.0.0.1", description="Address to bind; 127.0.0.1 unless set otherwise.")
    port: int = Field(9000, ge=0, le=65535, description="Port to bind (0: pick a free one).")


def make_http_gateway(*, settings: HttpGatewaySettings, context: BackendContext):
    """Factory registered for `kind = "http"`."""
    from .gateway_http_app import HttpGateway

    return HttpGateway(settings, context)
