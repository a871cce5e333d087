"""Publishing behaviour against real S3 servers: incremental uploads, failures, errors, secrets."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import botocore.exceptions
import pytest
from bioengine_storage_s3 import S3Storage, S3StorageError

from bioengine_core.errors import StorageError
from bioengine_core.testing.storage import read_tree

pytestmark = pytest.mark.s3

V1 = {
    "config.pbtxt": b'name: "m"\nbackend: "python"\n',
    "1/model.py": b"# version one\n",
    "1/weights.bin": os.urandom(300_000),
}


class Requests:
    """Counts the S3 requests a storage's client sends, by operation (PutObject, CopyObject...)."""

    def __init__(self, storage: S3Storage):
        self.calls: list[tuple[str, str]] = []
        storage.client.meta.events.register("before-call.s3", self._record)

    def _record(self, model, params, **_) -> None:
        key = params.get("url_path", "")
        self.calls.append((model.name, key))

    def count(self, operation: str) -> int:
        """How many requests of `operation` went out."""
        return sum(1 for op, _ in self.calls if op == operation)

    def clear(self) -> None:
        """Forget what was counted so far."""
        self.calls.clear()


def tree_objects(server, prefix: str, name: str) -> dict[str, dict]:
    """The model tree as any S3 client sees it: relative key -> {ETag, LastModified, Size}."""
    client = server.client()
    base = f"{prefix}/{name}/"
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=server.bucket, Prefix=base)
        return {
            obj["Key"][len(base) :]: obj
            for page in pages
            for obj in page.get("Contents", [])
            if not obj["Key"].endswith("/")
        }
    finally:
        client.close()


@pytest.fixture(params=["seaweedfs", "moto"])
def server(request):
    """Each behaviour test runs against SeaweedFS and against moto."""
    return request.getfixturevalue("seaweed" if request.param == "seaweedfs" else "moto_s3")


def test_republishing_sends_only_changed_files(
    server, make_storage, prefix, write_model, tmp_path, caplog
):
    """A second put uploads only new content and rewrites only changed files in the tree."""
    storage = make_storage(server, prefix)
    requests = Requests(storage)
    src = write_model(tmp_path / "src", V1)
    storage.put("m", src)
    assert requests.count("PutObject") == 3 + 1  # three files and the manifest
    before = tree_objects(server, prefix, "m")
    assert sorted(before) == sorted(V1)

    (src / "1" / "model.py").write_bytes(b"# version two\n")
    (src / "1" / "extra.txt").write_bytes(b"new file\n")
    requests.clear()
    with caplog.at_level(logging.INFO, logger="bioengine.storage.s3"):
        storage.put("m", src)
    report = storage.last_publish
    assert report is not None
    assert report.uploaded == ["1/extra.txt", "1/model.py"]
    assert report.updated == ["1/extra.txt", "1/model.py"]
    assert report.unchanged == ["1/weights.bin", "config.pbtxt"]
    assert requests.count("PutObject") == 2 + 1
    assert requests.count("CopyObject") == 2
    assert "2 file(s) uploaded" in caplog.text and "2 unchanged" in caplog.text
    after = tree_objects(server, prefix, "m")
    for rel in ("1/weights.bin", "config.pbtxt"):  # untouched objects keep their identity
        assert after[rel]["ETag"] == before[rel]["ETag"]
        assert after[rel]["LastModified"] == before[rel]["LastModified"]
    assert read_tree(storage.get("m", tmp_path / "out")) == read_tree(src)


def all_objects(server, prefix: str) -> dict[str, tuple]:
    """Every object under `prefix` (tree, blobs, manifests): key -> (ETag, LastModified)."""
    client = server.client()
    try:
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=server.bucket, Prefix=prefix + "/"
        )
        return {
            obj["Key"]: (obj["ETag"], obj["LastModified"])
            for page in pages
            for obj in page.get("Contents", [])
        }
    finally:
        client.close()


def test_a_restart_with_unchanged_models_writes_nothing(
    server, make_storage, prefix, write_model, tmp_path
):
    """What a restart of `serve` does: a new storage publishes the same model again. No request
    may write (the manifest included), so every object keeps its ETag and time."""
    src = write_model(tmp_path / "src", V1)
    make_storage(server, prefix).put("m", src)
    before = all_objects(server, prefix)
    assert any(key.endswith("m.json") for key in before), before  # the manifest is there

    restarted = make_storage(server, prefix)
    requests = Requests(restarted)
    restarted.put("m", src)
    written = [op for op, _ in requests.calls if op.startswith(("Put", "Copy", "Delete"))]
    written += [op for op, _ in requests.calls if op in ("CreateMultipartUpload",)]
    assert written == [], requests.calls
    assert all_objects(server, prefix) == before
    assert restarted.last_publish.updated == [] and restarted.last_publish.uploaded == []

    (src / "1" / "model.py").write_bytes(b"# changed\n")  # a change is still published
    restarted.put("m", src)
    after = all_objects(server, prefix)
    assert after != before
    assert restarted.last_publish.updated == ["1/model.py"]


def test_identical_content_is_stored_once_across_models(
    server, make_storage, prefix, write_model, tmp_path
):
    """Publishing a second model with the same weights sends no weights again."""
    storage = make_storage(server, prefix)
    storage.put("a", write_model(tmp_path / "a", V1))
    storage.put("b", write_model(tmp_path / "b", {**V1, "config.pbtxt": b'name: "b"\n'}))
    assert storage.last_publish.uploaded == ["config.pbtxt"]
    assert sorted(tree_objects(server, prefix, "b")) == sorted(V1)
    storage.delete("a")  # b's content must survive a's deletion
    assert read_tree(storage.get("b", tmp_path / "out"))["1/weights.bin"] == V1["1/weights.bin"]


def test_files_changed_behind_its_back_are_repaired(
    server, make_storage, prefix, write_model, tmp_path
):
    """An object overwritten or deleted by someone else is rewritten by the next put."""
    storage = make_storage(server, prefix)
    src = write_model(tmp_path / "src", V1)
    storage.put("m", src)
    client = server.client()
    client.put_object(Bucket=server.bucket, Key=f"{prefix}/m/1/weights.bin", Body=b"tampered")
    client.delete_object(Bucket=server.bucket, Key=f"{prefix}/m/1/model.py")
    client.close()
    storage.put("m", src)
    assert storage.last_publish.uploaded == []  # the content was still in the bucket
    assert storage.last_publish.updated == ["1/model.py", "1/weights.bin"]
    tree = tree_objects(server, prefix, "m")
    assert tree["1/weights.bin"]["Size"] == len(V1["1/weights.bin"])
    assert sorted(tree) == sorted(V1)


def test_files_the_new_version_lacks_are_removed(
    server, make_storage, prefix, write_model, tmp_path
):
    """The tree Triton reads holds exactly the new version's files after a replace."""
    storage = make_storage(server, prefix)
    storage.put("m", write_model(tmp_path / "v1", V1))
    v2 = {"config.pbtxt": b'name: "m"\nbackend: "onnxruntime"\n', "1/model.onnx": b"onnx"}
    storage.put("m", write_model(tmp_path / "v2", v2))
    assert storage.last_publish.removed == ["1/model.py", "1/weights.bin"]
    assert sorted(tree_objects(server, prefix, "m")) == sorted(v2)


def test_a_failed_publish_leaves_the_old_version_whole(
    server, make_storage, prefix, write_model, tmp_path
):
    """When the switch fails midway, get() and the tree still give the old version."""
    storage = make_storage(server, prefix, max_attempts=1)
    storage.put("m", write_model(tmp_path / "v1", V1))
    v2 = {**V1, "1/model.py": b"# version two\n", "config.pbtxt": b'name: "m"\n# v2\n'}
    src2 = write_model(tmp_path / "v2", v2)

    def refuse_config_copy(params, **_) -> None:
        # Fault injection: the connection drops when the new config.pbtxt is copied into place.
        if params["url_path"].endswith("/m/config.pbtxt"):
            raise botocore.exceptions.EndpointConnectionError(endpoint_url=server.endpoint)

    storage.client.meta.events.register("before-call.s3.CopyObject", refuse_config_copy)
    with pytest.raises(S3StorageError) as failed:
        storage.put("m", src2)
    assert failed.value.code == "EndpointConnectionError"
    assert "config.pbtxt" in str(failed.value)
    storage.client.meta.events.unregister("before-call.s3.CopyObject", refuse_config_copy)

    assert storage.list() == ["m"]
    assert read_tree(storage.get("m", tmp_path / "out")) == V1
    client = server.client()
    body = client.get_object(Bucket=server.bucket, Key=f"{prefix}/m/1/model.py")["Body"].read()
    client.close()
    assert body == V1["1/model.py"], "the tree was not put back to the old version"

    storage.put("m", src2)  # the retry only switches the tree: the content is already there
    assert storage.last_publish.uploaded == []
    assert read_tree(storage.get("m", tmp_path / "out2")) == v2


def test_large_files_upload_in_parts_with_progress(
    seaweed, make_storage, prefix, write_model, tmp_path, caplog
):
    """A file above the multipart threshold goes up in parts; progress is logged."""
    storage = make_storage(seaweed, prefix, multipart_threshold_mb=5)
    requests = Requests(storage)
    big = os.urandom(11 * 1024 * 1024)
    with caplog.at_level(logging.INFO, logger="bioengine.storage.s3"):
        storage.put("big", write_model(tmp_path / "src", {"config.pbtxt": b"x", "1/w.bin": big}))
    assert requests.count("UploadPart") >= 2
    assert "uploading big/1/w.bin: 100% of 11.0 MB" in caplog.text
    assert read_tree(storage.get("big", tmp_path / "out"))["1/w.bin"] == big


def test_missing_bucket_is_an_error_unless_create_bucket(seaweed, make_storage, prefix, tmp_path):
    """Without create_bucket a missing bucket is reported by name with S3's code."""
    name = f"absent-{prefix}"
    storage = make_storage(seaweed, prefix, bucket=name, create_bucket=False)
    with pytest.raises(S3StorageError) as missing:
        storage.list()
    assert missing.value.code == "NoSuchBucket" and name in str(missing.value)
    assert "create_bucket" in str(missing.value)

    creating = make_storage(seaweed, prefix, bucket=name, create_bucket=True)
    try:
        assert creating.list() == []
    finally:
        creating.client.delete_bucket(Bucket=name)


def test_wrong_secret_fails_with_s3_error_code(
    seaweed, make_storage, prefix, write_model, tmp_path
):
    """A bad secret: put, list, get and delete (what serve calls) each fail with one line
    carrying S3's error code and the settings to fix, never a boto3 exception or the secret."""
    storage = make_storage(seaweed, prefix, secret_access_key="not-the-secret", max_attempts=1)
    src = write_model(tmp_path / "src", V1)
    calls = {
        "put": lambda: storage.put("m", src),
        "list": storage.list,
        "get": lambda: storage.get("m", tmp_path / "out"),
        "delete": lambda: storage.delete("m"),
    }
    for what, call in calls.items():
        with pytest.raises(StorageError) as denied:
            call()
        message = str(denied.value)
        assert isinstance(denied.value, S3StorageError), what
        assert denied.value.code == "SignatureDoesNotMatch", (what, message)
        assert "\n" not in message and denied.value.code in message
        assert "credentials refused: check [storage] access_key_id / secret_access_key" in message
        assert "not-the-secret" not in message and seaweed.access_key not in message


def test_errors_while_serving_name_cause_and_fix(
    seaweed, seaweed_reader, make_storage, prefix, write_model, tmp_path
):
    """What serve reports from put/get when the bucket policy refuses writes or the bucket is
    gone: one line each, with the cause and what to do."""
    admin = make_storage(seaweed, prefix)
    src = write_model(tmp_path / "src", V1)
    admin.put("m", src)

    reader = make_storage(
        seaweed,
        prefix,
        access_key_id=seaweed_reader[0],
        secret_access_key=seaweed_reader[1],
        max_attempts=1,
    )
    assert reader.list() == ["m"]  # may read ...
    (src / "1" / "model.py").write_bytes(b"# changed\n")
    with pytest.raises(S3StorageError) as refused:  # ... but not write
        reader.put("m", src)
    assert refused.value.code == "AccessDenied"
    assert "the bucket policy (this user needs list, read and write" in str(refused.value)
    assert "[storage] access_key_id / secret_access_key" in str(refused.value)

    gone = make_storage(seaweed, prefix, bucket=f"gone-{prefix}", create_bucket=False)
    with pytest.raises(S3StorageError) as missing:
        gone.get("m", tmp_path / "out")
    assert f"bucket 'gone-{prefix}' does not exist" in str(missing.value)
    assert "fix [storage] bucket" in str(missing.value)


def test_unreachable_endpoint_is_a_storage_error(make_storage, seaweed, prefix):
    """No server at the endpoint: StorageError naming the endpoint, after the configured attempts."""
    from core_helpers import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    storage = make_storage(seaweed, prefix, endpoint_url=endpoint, max_attempts=1)
    with pytest.raises(S3StorageError) as down:
        storage.list()
    assert down.value.code == "EndpointConnectionError"
    assert f"no S3 server answers at {endpoint}: check [storage] endpoint_url" in str(down.value)


def test_get_of_damaged_content_fails_clearly(seaweed, make_storage, prefix, write_model, tmp_path):
    """Content changed out of band fails get() with a message saying to publish again."""
    storage = make_storage(seaweed, prefix, read_timeout=1)
    storage.put("m", write_model(tmp_path / "src", V1))
    client = seaweed.client()
    blobs = client.list_objects_v2(Bucket=seaweed.bucket, Prefix=f"{prefix}/.bioengine/blobs/")
    for obj in blobs["Contents"]:
        client.put_object(Bucket=seaweed.bucket, Key=obj["Key"], Body=b"damaged")
    client.close()
    with pytest.raises(StorageError, match="publish it again"):
        storage.get("m", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sync_mirror_reuses_unchanged_files(seaweed, make_storage, prefix, write_model, tmp_path):
    """Mode sync: a republish downloads only changed files; the mirror swaps in one step."""
    storage = make_storage(seaweed, prefix, mode="sync")
    src = write_model(tmp_path / "src", V1)
    storage.put("m", src)
    mirror = storage.location().local_path
    assert mirror is not None
    weights_before = (mirror / "m" / "1" / "weights.bin").stat().st_ino
    (src / "1" / "model.py").write_bytes(b"# version two\n")
    requests = Requests(storage)
    storage.put("m", src)
    downloads = [key for op, key in requests.calls if op == "GetObject" and "/blobs/" in key]
    assert len(downloads) == 1  # model.py only; weights.bin and config.pbtxt are reused
    assert (mirror / "m" / "1" / "weights.bin").stat().st_ino == weights_before
    assert read_tree(mirror / "m") == read_tree(src)
    assert (mirror / "m").is_symlink()

    storage.delete("m")
    assert not (mirror / "m").exists() and storage.list() == []


def test_a_new_engine_mirrors_what_is_already_published(
    seaweed, make_storage, prefix, write_model, tmp_path
):
    """Mode sync: location() on a fresh instance mirrors the bucket and drops stale models."""
    publisher = make_storage(seaweed, prefix)
    publisher.put("kept", write_model(tmp_path / "src", V1))
    reader = make_storage(seaweed, prefix, mode="sync")
    mirror = reader.sync_dir
    assert mirror is not None
    (mirror / "gone").mkdir(parents=True)
    (mirror / "gone" / "config.pbtxt").write_text("old")
    (mirror / ".kept.0123.abcd.v").mkdir()  # left by an interrupted mirror run
    location = reader.location()
    assert location.local_path == mirror
    assert read_tree(mirror / "kept") == V1
    assert not (mirror / "gone").exists()
    assert sorted(p.name for p in mirror.iterdir() if not p.name.endswith(".json")) == [
        os.readlink(mirror / "kept"),
        "kept",
    ]


def test_list_hides_models_whose_first_publish_failed(
    seaweed, make_storage, prefix, write_model, tmp_path
):
    """A model is listed only once its manifest is written; a failed first publish leaves none."""
    storage = make_storage(seaweed, prefix, max_attempts=1)

    def refuse_manifest(params, **_) -> None:
        if "/.bioengine/models/" in params["url_path"]:
            raise botocore.exceptions.EndpointConnectionError(endpoint_url=seaweed.endpoint)

    storage.client.meta.events.register("before-call.s3.PutObject", refuse_manifest)
    with pytest.raises(S3StorageError):
        storage.put("m", write_model(tmp_path / "src", V1))
    storage.client.meta.events.unregister("before-call.s3.PutObject", refuse_manifest)
    assert storage.list() == []
    assert tree_objects(seaweed, prefix, "m") == {}, "the failed first publish left files"


def test_invalid_names_are_refused(seaweed, make_storage, prefix, tmp_path: Path):
    """Names Triton cannot load or that escape the tree are refused before any request."""
    storage = make_storage(seaweed, prefix)
    for bad in ("", ".hidden", "a/b", "sp ace"):
        with pytest.raises(StorageError):
            storage.get(bad, tmp_path / "out")
