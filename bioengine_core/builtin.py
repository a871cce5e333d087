"""The core's own backends, registered through the same hooks as any plugin."""

from __future__ import annotations

from .contracts import GatewayType, ModelSourceType, StorageType
from .hookspecs import hookimpl


@hookimpl
def bioengine_register_storages() -> list[StorageType]:
    from .storage_local import LocalStorageSettings, make_local_storage

    return [
        StorageType(
            "local",
            LocalStorageSettings,
            make_local_storage,
            "model repository in a local or shared directory",
        )
    ]


@hookimpl
def bioengine_register_model_sources() -> list[ModelSourceType]:
    from .sources import (
        BundledSource,
        BundledSourceSettings,
        FolderSource,
        FolderSourceSettings,
        ZipSource,
        ZipSourceSettings,
    )
    from .sources_zoo import ZooSource, ZooSourceSettings

    return [
        ModelSourceType(
            "folder",
            FolderSourceSettings,
            lambda *, settings, context: FolderSource(context),
            "a directory holding a bioimage.io package",
            schemes=("folder",),
        ),
        ModelSourceType(
            "zip",
            ZipSourceSettings,
            lambda *, settings, context: ZipSource(context),
            "a zipped bioimage.io package",
            schemes=("zip",),
        ),
        ModelSourceType(
            "bundled",
            BundledSourceSettings,
            lambda *, settings, context: BundledSource(),
            "a package shipped with BioEngine (`bioengine models bundled`)",
            schemes=("bundled",),
        ),
        ModelSourceType(
            "bioimageio",
            ZooSourceSettings,
            lambda *, settings, context: ZooSource(settings, context),
            "BioImage Model Zoo ids, DOIs and https URLs, into a verified cache",
            schemes=("bioimageio", "doi", "https", "http"),
        ),
    ]


@hookimpl
def bioengine_register_gateways() -> list[GatewayType]:
    from .gateway_http import HttpGatewaySettings, make_http_gateway

    return [
        GatewayType(
            "http",
            HttpGatewaySettings,
            make_http_gateway,
            "KServe v2 / Triton HTTP protocol, /health and /metrics",
        )
    ]
