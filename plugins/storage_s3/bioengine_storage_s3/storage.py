"""S3Storage: the Triton model repository in an S3 bucket, published atomically and incrementally.

Layout under `s3://BUCKET/PREFIX/`:

    NAME/config.pbtxt, NAME/1/...        the model tree: exactly what Triton reads
    .bioengine/models/NAME.json          the model's manifest: version id and, per file, sha256,
                                         size and the ETag of the object in the tree
    .bioengine/blobs/SHA256              every published file's content, stored once, immutable

A model exists (for `list`/`get`) once its manifest exists, and a new version becomes visible to
`list`/`get` in one step: the single PUT of the new manifest. `get` reads the manifest and
downloads the blobs it names, which never change, so it always returns one complete version,
also while a publish runs or after one failed. The blobs of the version before the current one
are kept, so a `get` that started before a publish finishes too.

`put` is incremental: a file's content is uploaded only when no blob with its sha256 exists yet
(identical files in other models or earlier versions are not sent again), and a file in the
tree is rewritten only when its sha256 differs from the manifest's or the object there is not the
one the manifest recorded (ETag changed, or missing). The slow part, uploading, goes to blobs
that Triton never reads. Then the tree is switched by server-side copies: changed files first,
`config.pbtxt` last, then files the new version lacks are deleted, then the manifest is written.
If that switch fails, the tree is put back to the old version (best effort).

What Triton sees: a model (re)loaded after `put()` returned reads exactly the new version; a
loaded model is unaffected by later publishes (Triton copies the tree when it loads). A load
that overlaps the short switch may read a mixture, so load only after publishing (the engine
does). One publisher per repository: two processes publishing into one prefix at once is not
supported (within a process, `put` and `delete` are serialized).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3.exceptions
import botocore.exceptions
from boto3.s3.transfer import TransferConfig

from bioengine_core.contracts import RepositoryLocation, Storage
from bioengine_core.errors import StorageError

from .s3client import ERRORS as _ERRORS
from .s3client import S3Diagnosis, S3StorageError, s3_client
from .settings import S3StorageSettings

log = logging.getLogger("bioengine.storage.s3")

META = ".bioengine"
CONFIG = "config.pbtxt"
MANIFEST_FORMAT = 1
_CHUNK = 1024 * 1024


class _Changing(Exception):
    """A file did not match the manifest being read: a publish is in progress."""


@dataclass
class PublishReport:
    """What one `put()` did: which files went over the wire and which stayed."""

    name: str
    version: str
    uploaded: list[str] = field(default_factory=list)
    """Files whose content was sent (no blob with their sha256 existed)."""
    updated: list[str] = field(default_factory=list)
    """Files rewritten in the model tree (server-side copies of blobs)."""
    unchanged: list[str] = field(default_factory=list)
    """Files left as they were in the tree."""
    removed: list[str] = field(default_factory=list)
    """Files of the old version that the new one lacks, deleted from the tree."""
    bytes_uploaded: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        """One log line."""
        return (
            f"published {self.name} (version {self.version}): {len(self.uploaded)} file(s) "
            f"uploaded ({_size(self.bytes_uploaded)}), {len(self.updated)} updated, "
            f"{len(self.unchanged)} unchanged, {len(self.removed)} removed, "
            f"in {self.seconds:.1f} s"
        )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@dataclass
class _PublishPlan:
    """What one `put` sends and rewrites, decided from reads before anything is written."""

    tree: str
    """Key prefix of the model tree (`PREFIX/NAME/`)."""
    old: dict[str, Any] | None
    """The manifest of the version being replaced (None: a new model)."""
    missing: dict[str, str]
    """sha256 -> the first file with that content, for content no blob holds yet."""
    changed: list[str]
    """Files to (re)write in the tree."""
    stale: list[str]
    """Files of the old version the new one lacks (deleted from the tree)."""

    @property
    def old_files(self) -> dict[str, Any]:
        """The old manifest's files (empty for a new model)."""
        return self.old["files"] if self.old else {}


def _in_place(
    item: tuple[Path, int, str], before: dict[str, Any] | None, obj: dict[str, Any] | None
) -> bool:
    """True when the tree object `obj` is the one the old manifest recorded (`before`, by
    ETag and size) and has the content of the local file `item`: nothing to rewrite."""
    _, size, sha = item
    return bool(
        before
        and obj
        and before.get("sha256") == sha
        and before.get("etag")
        and before.get("etag") == obj.get("ETag")
        and obj.get("Size") == size
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _check_name(name: str) -> str:
    if (
        not name
        or "/" in name
        or name.startswith(".")
        or not all(c.isalnum() or c in "._-" for c in name)
    ):
        raise StorageError(
            f"invalid model name {name!r}: letters, digits, '.', '-' and '_', not starting with '.'"
        )
    return name


class _Progress:
    """boto3 transfer callback that logs a large file's progress in 25 % steps."""

    def __init__(self, label: str, total: int, report: Callable[[str], None]):
        self.label, self.total, self.report = label, total, report
        self.done = 0
        self.next_step = 25
        self.lock = threading.Lock()

    def __call__(self, amount: int) -> None:
        with self.lock:
            self.done += amount
            percent = 100 * self.done // max(self.total, 1)
            if percent >= self.next_step and self.next_step <= 100:
                self.report(f"{self.label}: {percent}% of {_size(self.total)}")
                self.next_step = (percent // 25 + 1) * 25


class S3Storage(Storage, S3Diagnosis):
    """Model repository in `s3://bucket/prefix/`; optionally mirrored to a local directory."""

    def __init__(
        self,
        settings: S3StorageSettings,
        *,
        sync_dir: Path | None = None,
        progress: Callable[[str], None] | None = None,
        quick: bool = False,
    ):
        self.settings = settings
        self.bucket = settings.bucket
        self.prefix = settings.prefix
        self.progress = progress or log.info
        self.last_publish: PublishReport | None = None
        try:
            self._credentials = settings.explicit_credentials()
        except KeyError as exc:
            raise StorageError(
                f"[storage] names the environment variable {exc.args[0]} for S3 credentials, "
                "but it is not set"
            ) from None
        self._client = s3_client(settings, self._credentials or {}, quick=quick)
        self._transfer = TransferConfig(
            multipart_threshold=settings.multipart_threshold_mb * 1024 * 1024,
            multipart_chunksize=max(8, settings.multipart_threshold_mb // 4) * 1024 * 1024,
            max_concurrency=settings.max_concurrency,
        )
        self._bucket_checked = False
        self._lock = threading.Lock()
        self._publishing = threading.RLock()
        self._mirroring = threading.RLock()
        self.sync_dir = Path(sync_dir) if sync_dir is not None else None
        if settings.mode == "sync" and self.sync_dir is None:
            raise StorageError('[storage] mode = "sync" needs a sync_dir')
        self._synced = False

    @property
    def client(self) -> Any:
        """The boto3 S3 client this storage uses (for inspection and request hooks)."""
        return self._client

    # ------------------------------------------------------------------ keys and errors

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def _manifest_key(self, name: str) -> str:
        return self._key(META, "models", f"{name}.json")

    def _missing_bucket(self) -> str:
        """Cause and fix of a bucket that does not exist."""
        endpoint = (
            f" --endpoint-url {self.settings.endpoint_url}" if self.settings.endpoint_url else ""
        )
        return (
            f"bucket {self.bucket!r} does not exist at {self._endpoint()}: create it (e.g. "
            f"aws s3 mb s3://{self.bucket}{endpoint}), set [storage] create_bucket = true, "
            "or fix [storage] bucket"
        )

    def _missing_object(self) -> str:
        """Cause and fix of an object that is gone while publishing or reading."""
        return (
            "the object is gone (deleted by hand, or does another process publish here?): "
            "publish the model again"
        )

    def preflight(self) -> list[str]:
        """Whether the bucket answers to these credentials (one HeadBucket and one small
        listing of the prefix, short timeouts, no retries): problems as one line each."""
        operation = "HeadBucket"
        try:
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except botocore.exceptions.ClientError as exc:
                if self._status(exc) not in (403, 404):
                    raise
                # HEAD answers carry no error code: a listing says which refusal it is
                # (SignatureDoesNotMatch, InvalidAccessKeyId, AccessDenied), and whether a
                # 404 is S3's NoSuchBucket or a server that is not S3 at all.
            operation = "ListObjectsV2"
            self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix + "/", MaxKeys=1)
        except botocore.exceptions.ClientError as exc:
            code = self._code(exc) or str(self._status(exc))
            if code in ("NoSuchBucket", "NotFound") and self.settings.create_bucket:
                return []  # serve creates it
            return [str(self._error(exc, operation))]
        except (botocore.exceptions.BotoCoreError, boto3.exceptions.Boto3Error) as exc:
            return [str(self._error(exc, operation))]
        return []

    # ------------------------------------------------------------------ bucket

    def ensure_bucket(self) -> None:
        """Check that the bucket exists (create it when `create_bucket`); once per instance."""
        if self._bucket_checked:
            return
        with self._lock:
            if self._bucket_checked:
                return
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except botocore.exceptions.ClientError as exc:
                code = self._code(exc) or str(self._status(exc))
                if code == "404" and not self._bucket_missing():
                    pass  # the listing found it (created meanwhile)
                elif code == "403":
                    # A HEAD answer has no error code: a listing says which refusal it is
                    # (or succeeds, when only HeadBucket is refused: then the bucket is usable).
                    self._call(
                        "ListObjectsV2",
                        "",
                        self._client.list_objects_v2,
                        Bucket=self.bucket,
                        Prefix=self.prefix + "/",
                        MaxKeys=1,
                    )
                elif code not in ("404", "NoSuchBucket", "NotFound"):
                    raise self._error(exc, "HeadBucket") from exc
                elif not self.settings.create_bucket:
                    raise S3StorageError(
                        self._missing_bucket(), code="NoSuchBucket", operation="HeadBucket"
                    ) from exc
                else:
                    self._create_bucket()
            except _ERRORS as exc:
                raise self._error(exc, "HeadBucket") from exc
            self._bucket_checked = True

    def _bucket_missing(self) -> bool:
        """After a HeadBucket 404 (a HEAD answer has no error code): True when a listing says
        NoSuchBucket, False when it lists; S3StorageError otherwise, e.g. for an endpoint that
        is not an S3 API (a bare 404)."""
        try:
            self._client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix + "/", MaxKeys=1)
        except botocore.exceptions.ClientError as exc:
            if self._code(exc) == "NoSuchBucket":
                return True
            raise self._error(exc, "ListObjectsV2") from exc
        except _ERRORS as exc:
            raise self._error(exc, "ListObjectsV2") from exc
        return False

    def _create_bucket(self) -> None:
        """Create the missing bucket (`create_bucket = true`); one that appeared meanwhile is fine."""
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.settings.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.settings.region}
        try:
            self._client.create_bucket(**kwargs)
            self.progress(f"created bucket {self.bucket}")
        except botocore.exceptions.ClientError as exc:
            if self._code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._error(exc, "CreateBucket") from exc
        except _ERRORS as exc:
            raise self._error(exc, "CreateBucket") from exc

    def _list(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Every object below `prefix` (keys ending in `/` are directory markers: skipped)."""
        paginator = self._client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):
                        yield obj
        except _ERRORS as exc:
            raise self._error(exc, "ListObjectsV2", prefix) from exc

    def _delete_keys(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            answer = self._call(
                "DeleteObjects",
                batch[0],
                self._client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True},
            )
            errors = [e for e in answer.get("Errors", []) if e.get("Code") != "NoSuchKey"]
            if errors:
                first = errors[0]
                raise S3StorageError(
                    f"S3 DeleteObjects of {self._url(first.get('Key', ''))} failed: "
                    f"{first.get('Code')}: {first.get('Message')}",
                    code=str(first.get("Code", "")),
                    operation="DeleteObjects",
                    key=str(first.get("Key", "")),
                )

    # ------------------------------------------------------------------ manifests

    def read_manifest(self, name: str) -> dict[str, Any] | None:
        """The published manifest of `name` (version id, files with sha256/size/etag), or None."""
        key = self._manifest_key(name)
        try:
            body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except botocore.exceptions.ClientError as exc:
            if self._code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise self._error(exc, "GetObject", key) from exc
        except _ERRORS as exc:
            raise self._error(exc, "GetObject", key) from exc
        try:
            manifest = json.loads(body)
            if not isinstance(manifest.get("files"), dict):
                raise ValueError("no files")
        except ValueError as exc:
            raise S3StorageError(
                f"manifest {self._url(key)} is not valid ({exc}); delete and republish {name}",
                code="InvalidManifest",
                operation="GetObject",
                key=key,
            ) from None
        return manifest

    # ------------------------------------------------------------------ Storage contract

    def _blob_key(self, sha: str) -> str:
        return self._key(META, "blobs", sha)

    def put(self, name: str, source: Path) -> None:
        """Publish `source` as `name`: upload new content, switch the tree, swap the manifest."""
        _check_name(name)
        source = Path(source)
        if not source.is_dir():
            raise StorageError(f"cannot publish {name}: {source} is not a directory")
        local: dict[str, tuple[Path, int, str]] = {}
        try:
            for path in sorted(source.rglob("*")):
                if path.is_file():
                    rel = path.relative_to(source).as_posix()
                    local[rel] = (path, path.stat().st_size, _sha256(path))
        except OSError as exc:
            raise StorageError(f"cannot read {source} to publish {name}: {exc}") from exc
        if not local:
            raise StorageError(f"cannot publish {name}: {source} holds no files")
        self.ensure_bucket()
        with self._publishing:
            manifest = self._put(name, local)
        if self.settings.mode == "sync":
            self._sync_model(name, manifest)

    def _put(self, name: str, local: dict[str, tuple[Path, int, str]]) -> dict[str, Any]:
        """Publish the files `local` (rel -> path, size, sha256) as `name`; the new manifest."""
        started = time.monotonic()
        report = PublishReport(name=name, version=uuid.uuid4().hex[:12])
        plan = self._plan_publish(name, local)
        if (
            plan.old is not None
            and _same_files(plan.old, local)
            and not (plan.missing or plan.changed or plan.stale)
        ):
            # A restart with an unchanged model: nothing is written, so the objects' ETags and
            # times stay as they were and `sync` mirrors have nothing to fetch.
            report.version = str(plan.old.get("version", ""))
            report.unchanged = sorted(local)
            report.seconds = time.monotonic() - started
            self.last_publish = report
            self.progress(f"{name}: unchanged in {self._url(plan.tree)}; nothing written")
            return plan.old

        # 1. Content: upload what the bucket does not hold yet (invisible to Triton and get).
        self._upload_blobs(name, local, plan.missing)
        report.uploaded = sorted(rel for rel, (_, _, sha) in local.items() if sha in plan.missing)
        report.bytes_uploaded = sum(local[rel][1] for rel in plan.missing.values())

        # 2. The tree (changed files, config.pbtxt last, then deletions), then the manifest:
        # the one step that makes the new version visible. A failure puts the tree back.
        try:
            etags = self._switch_tree(name, local, plan)
            manifest = self._write_manifest(name, report.version, local, etags)
        except BaseException:
            self._restore_tree(name, plan.old_files, plan.changed + plan.stale)
            raise
        report.updated = sorted(plan.changed)
        report.unchanged = sorted(rel for rel in local if rel not in plan.changed)
        report.removed = plan.stale

        # 3. Blobs no manifest needs any more (the replaced version's stay for running readers).
        try:
            self._collect_garbage(keep=plan.old)
        except StorageError as exc:  # the publish itself succeeded; the next one cleans up
            log.warning("published %s, but removing unused blobs failed: %s", name, exc)
        report.seconds = time.monotonic() - started
        self.last_publish = report
        self.progress(report.summary())
        return manifest

    def _plan_publish(self, name: str, local: dict[str, tuple[Path, int, str]]) -> _PublishPlan:
        """Compare `local` with the published manifest, the tree and the blobs (reads only)."""
        tree = self._key(name) + "/"
        old = self.read_manifest(name)
        old_files: dict[str, Any] = old["files"] if old else {}
        present = {obj["Key"][len(tree) :]: obj for obj in self._list(tree)}
        blobs_dir = self._key(META, "blobs") + "/"
        blobs = {obj["Key"][len(blobs_dir) :]: obj["Size"] for obj in self._list(blobs_dir)}
        missing: dict[str, str] = {}
        for rel, (_, size, sha) in local.items():
            if blobs.get(sha) != size and sha not in missing:
                missing[sha] = rel
        changed = [
            rel
            for rel, item in local.items()
            if not _in_place(item, old_files.get(rel), present.get(rel))
        ]
        stale = sorted(rel for rel in present if rel not in local)
        return _PublishPlan(tree=tree, old=old, missing=missing, changed=changed, stale=stale)

    def _upload_blobs(
        self, name: str, local: dict[str, tuple[Path, int, str]], missing: dict[str, str]
    ) -> None:
        """Upload the content of the files `missing` names, in parallel (progress for big ones)."""
        with ThreadPoolExecutor(max_workers=self.settings.max_concurrency) as pool:
            list(pool.map(lambda rel: self._upload_blob(name, rel, local[rel]), missing.values()))

    def _switch_tree(
        self, name: str, local: dict[str, tuple[Path, int, str]], plan: _PublishPlan
    ) -> dict[str, Any]:
        """Copy the changed files from their blobs into the tree (config.pbtxt last), delete the
        stale ones; the ETags S3 gave the objects now in place (the next put compares them)."""
        tree = plan.tree
        body = [rel for rel in plan.changed if rel != CONFIG]
        with ThreadPoolExecutor(max_workers=self.settings.max_concurrency) as pool:
            list(pool.map(lambda rel: self._copy_blob(local[rel][2], tree + rel), body))
        if CONFIG in plan.changed:
            self._copy_blob(local[CONFIG][2], tree + CONFIG)
        self._delete_keys([tree + rel for rel in plan.stale])
        etags = {obj["Key"][len(tree) :]: obj.get("ETag") for obj in self._list(tree)}
        absent = [rel for rel in local if rel not in etags]
        if absent:
            raise S3StorageError(
                f"files of {name} are missing from {self._url(tree)} right after publishing: "
                f"{', '.join(absent[:5])} (is another process writing there?)",
                code="NoSuchKey",
                operation="ListObjectsV2",
                key=tree + absent[0],
            )
        return etags

    def _write_manifest(
        self,
        name: str,
        version: str,
        local: dict[str, tuple[Path, int, str]],
        etags: dict[str, Any],
    ) -> dict[str, Any]:
        """PUT the manifest of version `version` (the single step that publishes it); returns it."""
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": name,
            "version": version,
            "published_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "files": {
                rel: {"sha256": sha, "size": size, "etag": etags[rel]}
                for rel, (_, size, sha) in local.items()
            },
        }
        key = self._manifest_key(name)
        self._call(
            "PutObject",
            key,
            self._client.put_object,
            Bucket=self.bucket,
            Key=key,
            Body=json.dumps(manifest, indent=1, sort_keys=True).encode(),
            ContentType="application/json",
        )
        return manifest

    def _restore_tree(self, name: str, old_files: dict[str, Any], touched: list[str]) -> None:
        """After a failed switch: put the `touched` tree files back as the old version had them."""
        if not touched:
            return
        tree = self._key(name) + "/"
        try:
            for rel in touched:
                entry = old_files.get(rel)
                if entry is not None:
                    self._copy_blob(entry["sha256"], tree + rel)
                else:
                    self._delete_keys([tree + rel])
            if old_files:
                log.warning("publishing %s failed; its tree is back at the old version", name)
        except Exception as exc:  # the original error matters more
            log.warning(
                "publishing %s failed and restoring its tree failed too (%s): publish it again "
                "before (re)loading it in Triton",
                name,
                exc,
            )

    def _collect_garbage(self, keep: dict[str, Any] | None) -> None:
        """Delete blobs that neither a published manifest nor `keep` refers to."""
        needed = {e["sha256"] for e in (keep or {}).get("files", {}).values()}
        for other in self.list():
            manifest = self.read_manifest(other)
            if manifest is not None:
                needed.update(e["sha256"] for e in manifest["files"].values())
        blobs_dir = self._key(META, "blobs") + "/"
        unused = [
            obj["Key"]
            for obj in self._list(blobs_dir)
            if obj["Key"][len(blobs_dir) :] not in needed
        ]
        self._delete_keys(unused)

    def _upload_blob(self, name: str, rel: str, item: tuple[Path, int, str]) -> None:
        path, size, sha = item
        key = self._blob_key(sha)
        callback = None
        if size >= self._transfer.multipart_threshold:
            callback = _Progress(f"uploading {name}/{rel}", size, self.progress)
        try:
            self._client.upload_file(
                str(path), self.bucket, key, Config=self._transfer, Callback=callback
            )
        except _ERRORS as exc:
            raise self._error(exc, "PutObject", key) from exc
        except OSError as exc:
            raise StorageError(f"cannot read {path} to publish {name}: {exc}") from exc

    def _copy_blob(self, sha: str, key: str) -> str:
        """Server-side copy of a blob to `key` in the tree; returns `key`."""
        source = {"Bucket": self.bucket, "Key": self._blob_key(sha)}
        try:
            self._client.copy(source, self.bucket, key, Config=self._transfer)
        except _ERRORS as exc:
            raise self._error(exc, "CopyObject", key) from exc
        return key

    def _download(self, key: str, dest: Path, sha: str, size: int) -> None:
        """Download `key` to `dest` and check its sha256; _Changing when absent or different."""
        dest.parent.mkdir(parents=True, exist_ok=True)
        callback = None
        if size >= self._transfer.multipart_threshold:
            callback = _Progress(f"downloading {dest.name}", size, self.progress)
        try:
            self._client.download_file(
                self.bucket, key, str(dest), Config=self._transfer, Callback=callback
            )
        except botocore.exceptions.ClientError as exc:
            if self._code(exc) in ("NoSuchKey", "404", "NotFound"):
                raise _Changing(key) from exc
            raise self._error(exc, "GetObject", key) from exc
        except _ERRORS as exc:
            raise self._error(exc, "GetObject", key) from exc
        if _sha256(dest) != sha:
            raise _Changing(key)

    def _fetch_version(
        self, name: str, into: Path, reuse: Callable[[str, dict[str, Any]], Path | None]
    ) -> dict[str, Any]:
        """Fill `into` with the published version of `name` (from its blobs); its manifest.

        `reuse(rel, entry)` may name a local file with the same content (skips the download).
        A blob can only vanish when two publishes finished during the read: then the manifest
        is read again, until `read_timeout`.
        """
        deadline = time.monotonic() + self.settings.read_timeout
        delay = 0.05
        last = ""
        while True:
            manifest = self.read_manifest(name)
            if manifest is None:
                raise StorageError(
                    f"model {name!r} is not in the repository {self._url(self._key())}"
                )
            try:
                self._fill(into, manifest, reuse)
                return manifest
            except _Changing as exc:
                last = str(exc)
            if time.monotonic() > deadline:
                raise StorageError(
                    f"model {name!r} in {self._url(self._key())}: its content is missing or "
                    f"damaged (last: {last}) after {self.settings.read_timeout:.0f} s of "
                    "retries: publish it again"
                )
            time.sleep(delay)
            delay = min(delay * 2, 1.0)

    def _fill(
        self,
        into: Path,
        manifest: dict[str, Any],
        reuse: Callable[[str, dict[str, Any]], Path | None],
    ) -> None:
        """Make `into` hold the files of `manifest`: linked or copied where `reuse` names a local
        file with that content, else downloaded from the blobs; _Changing when one is gone."""
        shutil.rmtree(into, ignore_errors=True)
        into.mkdir(parents=True)
        jobs = []
        for rel, entry in manifest["files"].items():
            target = into / rel
            same = reuse(rel, entry)
            if same is not None:
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(same, target)
                except OSError:
                    shutil.copy2(same, target)
                continue
            jobs.append((self._blob_key(entry["sha256"]), target, entry["sha256"], entry["size"]))
        with ThreadPoolExecutor(max_workers=self.settings.max_concurrency) as pool:
            list(pool.map(lambda job: self._download(*job), jobs))

    def get(self, name: str, dest: Path) -> Path:
        """Copy one complete version of model `name` into `dest`; StorageError if absent."""
        _check_name(name)
        self.ensure_bucket()
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            self._fetch_version(name, tmp, lambda rel, entry: None)
            shutil.copytree(tmp, dest, dirs_exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot write model {name!r} to {dest}: {exc}") from exc
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest

    def list(self) -> list[str]:
        """Names with a manifest (published completely), sorted."""
        self.ensure_bucket()
        base = self._key(META, "models") + "/"
        names = []
        for obj in self._list(base):
            rel = obj["Key"][len(base) :]
            if rel.endswith(".json") and "/" not in rel:
                names.append(rel[: -len(".json")])
        return sorted(names)

    def delete(self, name: str) -> None:
        """Remove the manifest (the model disappears at once), its tree and unused blobs."""
        _check_name(name)
        self.ensure_bucket()
        with self._publishing:
            key = self._manifest_key(name)
            self._call("DeleteObject", key, self._client.delete_object, Bucket=self.bucket, Key=key)
            tree = self._key(name) + "/"
            self._delete_keys([obj["Key"] for obj in self._list(tree)])
            self._collect_garbage(keep=None)
        if self.sync_dir is not None:
            self._unsync(name)
        self.progress(f"deleted {name} from {self._url(tree)}")

    def location(self) -> RepositoryLocation:
        """`s3://...` plus credentials for replicas, or the local mirror in mode `sync`."""
        if self.settings.mode == "sync":
            assert self.sync_dir is not None
            if not self._synced:
                self.sync()
            return RepositoryLocation(uri=str(self.sync_dir), local_path=self.sync_dir)
        return RepositoryLocation(uri=self.settings.triton_uri(), env=self.replica_env())

    def replica_env(self) -> dict[str, str]:
        """Environment a Triton replica needs to read the bucket (region, credentials)."""
        env = {"AWS_DEFAULT_REGION": self.settings.region, "AWS_REGION": self.settings.region}
        env.update(self._credentials or {})
        return env

    # ------------------------------------------------------------------ local mirror (sync)

    def sync(self) -> list[str]:
        """Mirror every published model into `sync_dir` (unchanged files are kept); names."""
        if self.sync_dir is None:
            raise StorageError("this storage has no sync_dir")
        with self._mirroring:
            return self._sync_all()

    def _sync_all(self) -> list[str]:
        assert self.sync_dir is not None
        self.sync_dir.mkdir(parents=True, exist_ok=True)
        names = self.list()
        for name in names:
            manifest = self.read_manifest(name)
            if manifest is not None:
                self._sync_model(name, manifest)
        for entry in self.sync_dir.iterdir():
            if not entry.name.startswith(".") and entry.name not in names:
                self._unsync(entry.name)
        # Leftovers of an interrupted run: temporary links, versions no link points to.
        for entry in list(self.sync_dir.iterdir()):
            if entry.name.startswith(".") and entry.name.endswith(".lnk"):
                entry.unlink(missing_ok=True)
        linked = {os.readlink(p) for p in self.sync_dir.iterdir() if p.is_symlink()}
        for entry in list(self.sync_dir.iterdir()):
            if entry.name.startswith(".") and entry.name.endswith((".v", ".tmp")):
                if entry.name not in linked:
                    shutil.rmtree(entry, ignore_errors=True)
        self._synced = True
        return names

    def _local_version(self, name: str) -> tuple[Path | None, dict[str, Any] | None]:
        assert self.sync_dir is not None
        try:
            version = self.sync_dir / os.readlink(self.sync_dir / name)
            manifest = json.loads((self.sync_dir / f".{name}.manifest.json").read_text())
        except (OSError, ValueError):
            return None, None
        return version, manifest

    def _sync_model(self, name: str, manifest: dict[str, Any]) -> None:
        """Bring the mirror of `name` to `manifest`'s version: download only what changed."""
        with self._mirroring:
            self._mirror_model(name, manifest)

    def _mirror_model(self, name: str, manifest: dict[str, Any]) -> None:
        assert self.sync_dir is not None
        self.sync_dir.mkdir(parents=True, exist_ok=True)
        current, current_manifest = self._local_version(name)
        if current is not None and current_manifest is not None:
            if current_manifest.get("version") == manifest.get("version") and current.is_dir():
                return
        old_files = (current_manifest or {}).get("files", {})

        def reuse(rel: str, entry: dict[str, Any]) -> Path | None:
            before = old_files.get(rel)
            if current is not None and before and before.get("sha256") == entry["sha256"]:
                path = current / rel
                if path.is_file():
                    return path
            return None

        tag = uuid.uuid4().hex[:8]
        tmp = self.sync_dir / f".{name}.{tag}.tmp"
        try:
            fetched = self._fetch_version(name, tmp, reuse)
            version = self.sync_dir / f".{name}.{fetched['version']}.{tag}.v"
            os.rename(tmp, version)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        manifest_tmp = self.sync_dir / f".{name}.{tag}.json"
        manifest_tmp.write_text(json.dumps(fetched))
        link = self.sync_dir / f".{name}.{tag}.lnk"
        os.symlink(version.name, link)
        target = self.sync_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(link, target)
        os.replace(manifest_tmp, self.sync_dir / f".{name}.manifest.json")
        if current is not None and current != version:
            shutil.rmtree(current, ignore_errors=True)
        self.progress(f"mirrored {name} (version {fetched['version']}) to {target}")

    def _unsync(self, name: str) -> None:
        with self._mirroring:
            self._unmirror(name)

    def _unmirror(self, name: str) -> None:
        assert self.sync_dir is not None
        current, _ = self._local_version(name)
        target = self.sync_dir / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
        (self.sync_dir / f".{name}.manifest.json").unlink(missing_ok=True)
        if current is not None:
            shutil.rmtree(current, ignore_errors=True)

    def close(self) -> None:
        """Release the HTTP connections."""
        self._client.close()


def _same_files(manifest: dict[str, Any], local: dict[str, tuple[Path, int, str]]) -> bool:
    """True when `manifest` lists exactly the files of `local` with the same sha256 and size."""
    files = manifest.get("files") or {}
    return set(files) == set(local) and all(
        files[rel].get("sha256") == sha and files[rel].get("size") == size
        for rel, (_, size, sha) in local.items()
    )
