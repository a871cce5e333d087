"""Hook implementation: register the `hypha` gateway."""

from __future__ import annotations

from bioengine_core.contracts import BackendContext, Gateway, GatewayType
from bioengine_core.hookspecs import hookimpl

from .preflight import preflight
from .settings import HyphaGatewaySettings


def make_gateway(*, settings: HyphaGatewaySettings, context: BackendContext) -> Gateway:
    """Factory the core calls with the validated `[gateways.NAME]` section."""
    from .gateway import HyphaGateway

    return HyphaGateway(settings, context)


@hookimpl
def bioengine_register_gateways() -> list[GatewayType]:
    """The `hypha` gateway."""
    return [
        GatewayType(
            name="hypha",
            settings=HyphaGatewaySettings,
            factory=make_gateway,
            description="the service on a Hypha server: embedded (all-in-one) or remote (proxy)",
            preflight=preflight,
        )
    ]
