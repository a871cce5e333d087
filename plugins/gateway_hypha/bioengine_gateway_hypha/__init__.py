"""BioEngine gateway plugin: the BioEngine service on an embedded or remote Hypha server."""

from .settings import HyphaGatewaySettings

__all__ = ["HyphaGatewaySettings"]
