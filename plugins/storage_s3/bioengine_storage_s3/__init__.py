"""BioEngine S3 plugin: the Triton model repository in an S3 bucket (`[storage] kind = "s3"`)
and model packages read from a bucket (`[sources.s3]`)."""

from __future__ import annotations

from .settings import S3SourceSettings, S3StorageSettings
from .source import S3ModelSource
from .storage import PublishReport, S3Storage, S3StorageError

__all__ = [
    "PublishReport",
    "S3ModelSource",
    "S3SourceSettings",
    "S3Storage",
    "S3StorageError",
    "S3StorageSettings",
]
