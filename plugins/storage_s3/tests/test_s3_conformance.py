"""The core's storage conformance suite against real S3 servers, in both modes."""

from __future__ import annotations

import pytest

from bioengine_core.testing.storage import StorageConformance


@pytest.mark.s3
class TestS3StorageOnSeaweedFS(StorageConformance):
    """Mode `s3` (replicas read s3:// directly) against SeaweedFS."""

    @pytest.fixture
    def storage(self, seaweed, make_storage, prefix):
        return make_storage(seaweed, prefix)


@pytest.mark.s3
class TestS3StorageSyncOnSeaweedFS(StorageConformance):
    """Mode `sync` (a local mirror that replicas read) against SeaweedFS."""

    concurrent_rounds = 4

    @pytest.fixture
    def storage(self, seaweed, make_storage, prefix):
        return make_storage(seaweed, prefix, mode="sync")


@pytest.mark.s3
class TestS3StorageOnMoto(StorageConformance):
    """Mode `s3` against moto's emulator (a second S3 implementation)."""

    concurrent_rounds = 4

    @pytest.fixture
    def storage(self, moto_s3, make_storage, prefix):
        return make_storage(moto_s3, prefix)
