"""Hook implementations: register the `s3` storage and the `s3` model source."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bioengine_core.contracts import BackendContext, ModelSourceType, StorageType
from bioengine_core.hookspecs import hookimpl

from .settings import S3SourceSettings, S3StorageSettings

if TYPE_CHECKING:
    from .source import S3ModelSource
    from .storage import S3Storage


def make_storage(*, settings: S3StorageSettings, context: BackendContext) -> S3Storage:
    """Factory the core calls with the validated `[storage]` section."""
    from .storage import S3Storage

    sync_dir = None
    if settings.mode == "sync":
        sync_dir = (
            context.resolve_path(settings.sync_dir)
            if settings.sync_dir
            else context.state_dir / "s3-mirror"
        )
    # Progress lines go where the core shows them (a `progress` callable on the context, where
    # the core provides one), else to the log at INFO.
    progress = getattr(context, "progress", None) or context.logger.getChild("storage.s3").info
    return S3Storage(settings, sync_dir=sync_dir, progress=progress)


def preflight(*, settings: S3StorageSettings, context: BackendContext, offline: bool) -> list[str]:
    """Online: the bucket answers to the configured credentials (short timeouts, one try)."""
    if offline:
        return []
    from bioengine_core.errors import StorageError

    from .storage import S3Storage

    try:
        # only the bucket is contacted: a mirror path is named (sync mode needs one), not made
        mirror = context.state_dir / "s3-mirror" if settings.mode == "sync" else None
        storage = S3Storage(settings, sync_dir=mirror, progress=lambda _: None, quick=True)
    except StorageError as exc:
        return [str(exc)]
    try:
        return storage.preflight()
    finally:
        storage.client.close()


@hookimpl
def bioengine_register_storages() -> list[StorageType]:
    """The `s3` storage."""
    return [
        StorageType(
            name="s3",
            settings=S3StorageSettings,
            factory=make_storage,
            description="Model repository in an S3 bucket (AWS, MinIO, SeaweedFS, Ceph); "
            "atomic, incremental publishing; Triton reads s3:// or a local mirror",
            preflight=preflight,
        )
    ]


def make_source(*, settings: S3SourceSettings, context: BackendContext) -> S3ModelSource:
    """Factory the core calls with the validated `[sources.s3]` section (connects lazily)."""
    from .source import S3ModelSource

    return S3ModelSource(settings, context)


def source_preflight(
    *, settings: S3SourceSettings, context: BackendContext, offline: bool
) -> list[str]:
    """Online, when `[sources.s3] root` is set: the root answers to the configured credentials
    and holds something (short timeouts, one try). Without `root` there is nothing to contact:
    `[[models]]` references name their buckets, which are read when `serve` resolves them."""
    if offline or settings.offline or not settings.root:
        return []
    from .source import S3ModelSource

    return S3ModelSource(settings, context).preflight()


@hookimpl
def bioengine_register_model_sources() -> list[ModelSourceType]:
    """The `s3` model source (`s3://BUCKET/PREFIX/` references and catalog ids `s3:NAME`)."""
    return [
        ModelSourceType(
            name="s3",
            settings=S3SourceSettings,
            factory=make_source,
            description="bioimage.io packages in an S3 bucket (s3://BUCKET/PREFIX/, catalog "
            "ids under [sources.s3] root), into the verified cache",
            preflight=source_preflight,
            schemes=("s3",),
        )
    ]
