"""Fixtures for the S3 storage tests: a real SeaweedFS (started by .ci/start-s3.sh) and moto.

Each test gets its own prefix in a shared bucket and the prefix is emptied afterwards, so tests
never see each other's models and the server is left clean.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
from bioengine_storage_s3 import S3Storage, S3StorageSettings
from botocore.config import Config

from bioengine_core.testing.pytest_plugin import require_service

# The server `.ci/start-s3.sh` starts: on BIOENGINE_S3_PORT (the script's variable, default
# 23333), or wherever BIOENGINE_S3_ENDPOINT says.
SEAWEED_ENDPOINT = os.environ.get("BIOENGINE_S3_ENDPOINT") or (
    f"http://127.0.0.1:{os.environ.get('BIOENGINE_S3_PORT') or 23333}"
)
SEAWEED_ACCESS_KEY = os.environ.get("BIOENGINE_S3_ACCESS_KEY", "bioengine-ci")
SEAWEED_SECRET_KEY = os.environ.get("BIOENGINE_S3_SECRET_KEY", "bioengine-ci-secret")
# The script's second identity: may read and list, not write (a refusing bucket policy).
SEAWEED_READER = ("bioengine-ci-reader", "bioengine-ci-reader-secret")
TEST_BUCKET = "bioengine-tests"


@dataclass
class S3Server:
    """An S3 endpoint the tests may use, with credentials that can create buckets."""

    name: str
    endpoint: str
    access_key: str
    secret_key: str
    bucket: str = TEST_BUCKET
    """The bucket the tests share (each test under its own prefix)."""

    def client(self) -> Any:
        """A plain boto3 client, to look at the bucket the way any S3 user would."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )

    def empty(self, prefix: str) -> None:
        """Delete every object under `prefix/` in the test bucket."""
        empty_prefix(self, prefix)

    def settings(self, prefix: str, **overrides: Any) -> S3StorageSettings:
        """Storage settings for this server and `prefix` in the shared test bucket."""
        values: dict[str, Any] = {
            "endpoint_url": self.endpoint,
            "bucket": TEST_BUCKET,
            "prefix": prefix,
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
            "create_bucket": True,
        }
        values.update(overrides)
        return S3StorageSettings(**values)


def answers(endpoint: str) -> bool:
    """True when something speaks HTTP at `endpoint` (S3 answers 403 to anonymous requests)."""
    try:
        urllib.request.urlopen(endpoint + "/", timeout=2)
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError):
        return False
    return True


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def seaweed() -> S3Server:
    """The real S3 server (SeaweedFS) that `bash .ci/start-s3.sh` runs."""
    require_service(
        answers(SEAWEED_ENDPOINT), f"SeaweedFS S3 at {SEAWEED_ENDPOINT} (bash .ci/start-s3.sh)"
    )
    return S3Server("seaweedfs", SEAWEED_ENDPOINT, SEAWEED_ACCESS_KEY, SEAWEED_SECRET_KEY)


@pytest.fixture(scope="session")
def seaweed_reader(seaweed: S3Server) -> tuple[str, str]:
    """(key id, secret) of the SeaweedFS identity that may read and list but not write."""
    return SEAWEED_READER


@pytest.fixture(scope="session")
def moto_s3(tmp_path_factory) -> Iterator[S3Server]:
    """moto's S3 emulator as a real HTTP server on a free port, for the session."""
    binary = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    require_service(Path(binary).exists(), "moto_server (pip install 'moto[server]')")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [binary, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT
        )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while not answers(endpoint):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto_server did not start:\n{log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield S3Server("moto", endpoint, "testing", "testing")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def empty_prefix(server: S3Server, prefix: str) -> None:
    """Delete every object under `prefix/` in the test bucket."""
    client = server.client()
    paginator = client.get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=TEST_BUCKET, Prefix=prefix + "/"):
            keys = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=TEST_BUCKET, Delete={"Objects": keys, "Quiet": True})
    except client.exceptions.NoSuchBucket:
        pass
    finally:
        client.close()


@pytest.fixture
def prefix() -> str:
    """A key prefix unique to the test."""
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def make_storage(
    tmp_path: Path,
) -> Iterator[Callable[..., S3Storage]]:
    """Factory `make_storage(server, prefix, **settings)`; prefixes are emptied afterwards."""
    made: list[tuple[S3Server, str, S3Storage]] = []

    def make(server: S3Server, prefix: str, **overrides: Any) -> S3Storage:
        settings = server.settings(prefix, **overrides)
        sync_dir = tmp_path / f"mirror-{len(made)}" if settings.mode == "sync" else None
        storage = S3Storage(settings, sync_dir=sync_dir)
        made.append((server, prefix, storage))
        return storage

    yield make
    for server, prefix, storage in made:
        storage.close()
        empty_prefix(server, prefix)


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    """A directory holding `files` (relative path -> content)."""
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


@pytest.fixture
def write_model() -> Callable[[Path, dict[str, bytes]], Path]:
    """`write_model(dir, files)`: a model directory to publish."""
    return write_tree
