"""BioEngine storage plugin: the Triton model repository in an S3 bucket."""

from __future__ import annotations

from .settings import S3StorageSettings
from .storage import PublishReport, S3Storage, S3StorageError

__all__ = ["PublishReport", "S3Storage", "S3StorageError", "S3StorageSettings"]
