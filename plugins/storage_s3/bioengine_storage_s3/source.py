"""`[sources.s3]`: bioimage.io model packages that a site keeps in its own S3 bucket.

A package is a folder (`s3://BUCKET/PREFIX/`) holding its description (`bioimageio.yaml` or
`rdf.yaml`) and the files the description names, by paths relative to the folder. Resolving
reads the description, lists its files with bioimageio.spec, and hands them to the core's
verified cache (`bioengine_core.modelcache`): every file with a declared sha256 is checked
against it, a mismatch rejects the package naming the file, and a package lands in the cache
complete or not at all. Keys come only from validated parts (no `..`, no absolute paths, no
URLs): a description cannot make the engine read outside its folder or anywhere but S3.

References: `s3://BUCKET/PREFIX/` (a whole reference, `[[models]] source`) and `s3:NAME`
(catalog mode's ids, the folder `root/NAME/`). `listing()` offers every sub-folder of `root`
that holds a description, under the sub-folder's name.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from bioengine_core.contracts import BackendContext, ModelSource
from bioengine_core.errors import ModelError
from bioengine_core.modelcache import ModelCache, ProgressLine, RemoteFile, RemotePackage
from bioengine_core.util import write_json

from .s3client import (
    CONNECTION_CODES,
    ERRORS,
    S3Diagnosis,
    S3PackageMissing,
    S3SourceError,
    s3_client,
)
from .settings import S3SourceSettings, parse_s3_url

log = logging.getLogger("bioengine.sources.s3")

SECTION = "[sources.s3]"
DESCRIPTION_NAMES = ("bioimageio.yaml", "rdf.yaml")
MAX_DESCRIPTION_BYTES = 4 << 20
"""A description larger than this is refused (the zoo's are a few kB)."""
MANIFEST = ".bioengine-manifest.json"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
"""A catalog id, which is also one key segment (catalog mode's own rule)."""
_RESOURCE_ID = re.compile(r"^[a-z0-9_.-]+$")
"""What bioimageio.spec accepts as a description's `id`."""
_PROGRESS_FROM = 8 << 20
"""Files at least this large get download progress lines."""


@dataclass(frozen=True)
class S3Location:
    """A package folder in a bucket; `description` names its description file when the
    reference named one (else it is looked up)."""

    bucket: str
    prefix: str
    description: str = ""

    @property
    def url(self) -> str:
        """`s3://BUCKET/PREFIX/` (the cache's name for the package)."""
        return f"s3://{self.bucket}/{self.prefix}/" if self.prefix else f"s3://{self.bucket}/"

    @property
    def name(self) -> str:
        """The folder's own name (the package's id when its description has none)."""
        return self.prefix.rsplit("/", 1)[-1] if self.prefix else self.bucket

    def key(self, relative: str) -> str:
        """The object key of a file of the package."""
        return f"{self.prefix}/{relative}" if self.prefix else relative


def safe_relative(path: str) -> str:
    """`path` if it names a file inside a package folder; ValueError otherwise (absolute paths,
    `..`, empty or `.` segments, backslashes, URLs and drive letters, control characters)."""
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or ":" in path
        or any(ord(c) < 32 or ord(c) == 127 for c in path)
        or any(part in ("", ".", "..") for part in path.split("/"))
    ):
        raise ValueError(f"{path[:200]!r} is not a path inside the package folder")
    return path


class _Reader(S3Diagnosis):
    """Requests to one bucket, with errors naming `[sources.s3]`."""

    section = SECTION
    rights = "list and read"
    error_type = S3SourceError

    def __init__(self, settings: S3SourceSettings, client: Any, bucket: str, prefix: str):
        self.settings = settings
        self._client = client
        self.bucket = bucket
        self.prefix = prefix

    def _missing_bucket(self) -> str:
        return (
            f"bucket {self.bucket!r} does not exist at {self._endpoint()}: check the bucket "
            f"of the reference (or of {SECTION} root) and {SECTION} endpoint_url"
        )

    def _missing_object(self) -> str:
        return (
            "the object does not exist: upload it (a package folder holds every file its "
            "description names), or fix the description"
        )

    def get(self, key: str, *, limit: int) -> bytes:
        """An object's content; S3SourceError when it is larger than `limit` bytes."""
        answer = self._call("GetObject", key, self._client.get_object, Bucket=self.bucket, Key=key)
        body = answer["Body"]
        try:
            if int(answer.get("ContentLength") or 0) > limit:
                raise S3SourceError(
                    f"{self._url(key)} is larger than {limit >> 20} MB: not a description",
                    operation="GetObject",
                    key=key,
                )
            stream, data = _Stream(body, self, key), bytearray()
            while len(data) <= limit and (chunk := stream.read(1 << 20)):
                data += chunk
            return bytes(data)
        finally:
            body.close()

    def folder(self, prefix: str) -> tuple[list[dict[str, Any]], list[str]]:
        """(objects directly in `prefix/`, names of its sub-folders), at most 1000 each."""
        answer = self._call(
            "ListObjectsV2",
            f"{prefix}/" if prefix else "",
            self._client.list_objects_v2,
            Bucket=self.bucket,
            Prefix=f"{prefix}/" if prefix else "",
            Delimiter="/",
            MaxKeys=1000,
        )
        subs = [
            p["Prefix"].rstrip("/").rsplit("/", 1)[-1] for p in answer.get("CommonPrefixes", [])
        ]
        return answer.get("Contents", []), subs


class _Stream:
    """A downloading object body whose failures become one-line S3SourceErrors; reports
    progress for large files."""

    def __init__(
        self, body: Any, reader: _Reader, key: str, progress: ProgressLine | None = None
    ) -> None:
        self.body, self.reader, self.key, self.progress = body, reader, key, progress

    def read(self, size: int = -1) -> bytes:
        try:
            chunk = self.body.read(size) if size >= 0 else self.body.read()
        except (*ERRORS, OSError) as exc:
            raise self.reader._error(exc, "GetObject", self.key) from None
        if self.progress is not None:
            self.progress.update(len(chunk))
            if not chunk:
                self.progress.close()
        return chunk

    def close(self) -> None:
        self.body.close()


class S3ModelSource(ModelSource):
    """Resolves `s3://BUCKET/PREFIX/` and `s3:NAME` into verified package folders of the cache."""

    def __init__(self, settings: S3SourceSettings, context: BackendContext):
        self.settings = settings
        self.context = context
        self._client: Any = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ references
    def locate(self, ref: str) -> S3Location:
        """The package folder a reference names; ModelError for anything that is not a valid
        bucket and key path (a client's catalog id included)."""
        ref = ref.strip()
        try:
            if ref.startswith("s3://"):
                bucket, prefix = parse_s3_url(ref)
                head, _, last = prefix.rpartition("/")
                if last in DESCRIPTION_NAMES or last.endswith(".bioimageio.yaml"):
                    return S3Location(bucket, head, last)
                return S3Location(bucket, prefix)
        except ValueError as exc:
            raise ModelError(f"{ref[:200]!r}: {exc}") from None
        scheme, _, name = ref.partition(":")
        if scheme != "s3" or not name:
            raise ModelError(f"{ref[:200]!r}: expected s3://BUCKET/PREFIX/ or s3:NAME")
        if not _ID.fullmatch(name):
            raise ModelError(
                f"{ref[:200]!r}: a package name is letters, digits, '.', '-' and '_' (one "
                "folder below [sources.s3] root)"
            )
        root = self.settings.root_location()
        if root is None:
            raise ModelError(
                f'{ref}: s3:NAME needs {SECTION} root = "s3://BUCKET/PREFIX" (the folder whose '
                "sub-folders are packages); or name the package in full as s3://BUCKET/PREFIX/NAME/"
            )
        bucket, prefix = root
        return S3Location(bucket, f"{prefix}/{name}" if prefix else name)

    # ------------------------------------------------------------------ public
    def cache(self, cache_dir: Path) -> ModelCache:
        """The cache this source uses (the `cache_dir` setting wins over the engine's)."""
        s = self.settings
        root = self.context.resolve_path(s.cache_dir) if s.cache_dir else Path(cache_dir) / "s3"
        return ModelCache(
            root,
            progress=self._say,
            require_weights_sha256=s.require_weights_sha256,
            section=SECTION,
        )

    def resolve(self, ref: str, *, cache_dir: Path) -> Path:
        """The verified package folder for `ref` (fetched into the cache unless offline)."""
        location = self.locate(ref)
        cache = self.cache(cache_dir)
        if self.settings.offline:
            folder = cache.cached(location.url)
            if folder is None:
                raise ModelError(
                    f"{location.url} is not in the model cache at {cache.root} and {SECTION} "
                    f"offline = true; fill the cache first with `bioengine models pull {ref}`"
                )
            return folder
        try:
            package = self.describe(location)
        except S3SourceError as exc:
            if exc.code in CONNECTION_CODES and (folder := cache.cached(location.url)):
                self._say(f"{exc}; using the cached copy at {folder}")
                return folder
            raise
        return cache.store(package)

    def listing(self, *, cache_dir: Path) -> list[dict[str, Any]]:
        """Every sub-folder of `root` that holds a model description (at most `max_listed`):
        id (the sub-folder's name), name, description, tags, versions. The last good listing
        is kept, for offline mode and an unreachable server."""
        root = self.settings.root_location()
        if root is None:
            raise ModelError(
                f'{SECTION} root is not set: set root = "s3://BUCKET/PREFIX" (the folder whose '
                "sub-folders are packages) to list packages for catalog mode"
            )
        bucket, prefix = root
        url = S3Location(bucket, prefix).url
        saved = (
            self.cache(cache_dir).root
            / f"listing-{hashlib.sha256(url.encode()).hexdigest()[:16]}.json"
        )
        problem = f"{SECTION} offline = true"
        if not self.settings.offline:
            try:
                entries = self._list_root(bucket, prefix)
            except S3SourceError as exc:
                if exc.code not in CONNECTION_CODES:
                    raise
                problem = str(exc)
            else:
                write_json(saved, {"root": url, "collection": entries})
                return entries
        try:
            return list(json.loads(saved.read_text())["collection"])
        except (OSError, ValueError, KeyError, TypeError):
            raise ModelError(
                f"cannot list the packages in {url} ({problem}) and no earlier listing is saved "
                f"at {saved}"
            ) from None

    def preflight(self) -> list[str]:
        """Whether `root` answers to these credentials (one small listing, short timeouts, no
        retries) and holds anything: problems as one line each."""
        root = self.settings.root_location()
        if root is None:
            return []
        bucket, prefix = root
        try:
            client = s3_client(self.settings, self._credentials(), quick=True)
        except ModelError as exc:
            return [str(exc)]
        reader = _Reader(self.settings, client, bucket, prefix)
        try:
            objects, subs = reader.folder(prefix)
        except S3SourceError as exc:
            return [str(exc)]
        finally:
            client.close()
        if not objects and not subs:
            return [
                f"root {S3Location(bucket, prefix).url} holds nothing at {reader._endpoint()}: "
                f"upload packages there (one folder each) or fix {SECTION} root"
            ]
        return []

    def close(self) -> None:
        """Close the S3 client (if one was made)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    # ------------------------------------------------------------------ reading
    def _say(self, line: str) -> None:
        if self.context.progress is not None:
            self.context.progress(line)
        else:
            log.info("%s", line)

    def _credentials(self) -> dict[str, str]:
        try:
            return self.settings.explicit_credentials() or {}
        except KeyError as exc:
            raise ModelError(
                f"{SECTION} names the environment variable {exc.args[0]} for S3 credentials "
                "(access_key_id_env / secret_access_key_env), but it is not set: set it where "
                "`serve` runs"
            ) from None

    def _reader(self, bucket: str, prefix: str) -> _Reader:
        with self._lock:
            if self._client is None:
                self._client = s3_client(self.settings, self._credentials())
        return _Reader(self.settings, self._client, bucket, prefix)

    def describe(self, location: S3Location) -> RemotePackage:
        """Read a package's description from S3 and list the files it names (nothing else
        is downloaded yet)."""
        reader = self._reader(location.bucket, location.prefix)
        name = location.description or self._find_description(reader, location)
        where = f"{location.url}{name}"
        try:
            text = reader.get(location.key(name), limit=MAX_DESCRIPTION_BYTES)
        except S3SourceError as exc:
            if exc.code not in ("NoSuchKey", "404", "NotFound"):
                raise
            raise S3PackageMissing(
                f"no model package at {where}: that object does not exist (bucket "
                f"{location.bucket!r}, key {location.key(name)!r}); check the reference",
                code="NoSuchPackage",
                operation="GetObject",
                key=location.key(name),
            ) from None
        if len(text) > MAX_DESCRIPTION_BYTES:
            raise ModelError(f"{where} is larger than {MAX_DESCRIPTION_BYTES >> 20} MB")
        return self._package(reader, location, name, text)

    def _find_description(self, reader: _Reader, location: S3Location) -> str:
        objects, subs = reader.folder(location.prefix)
        names = {str(o["Key"]).rsplit("/", 1)[-1] for o in objects}
        for candidate in DESCRIPTION_NAMES:
            if candidate in names:
                return candidate
        others = sorted(n for n in names if n.endswith(".bioimageio.yaml"))
        if others:
            return others[0]
        where = f"bucket {location.bucket!r}, prefix {location.prefix + '/' if location.prefix else '(the bucket root)'!r}"
        at = f" at {self.settings.endpoint_url}" if self.settings.endpoint_url else ""
        if not objects and not subs:
            raise S3PackageMissing(
                f"no model package at {location.url}{at}: nothing is stored there ({where}); "
                f"check the reference (or {SECTION} root)",
                code="NoSuchPackage",
                operation="ListObjectsV2",
                key=location.prefix,
            )
        found = ", ".join(sorted(names)[:10] + [f"{s}/" for s in subs[:10]])
        raise S3PackageMissing(
            f"no model package at {location.url}{at}: no {' or '.join(DESCRIPTION_NAMES)} in "
            f"it ({where}; found {found}); upload the package's description there or fix the "
            "reference",
            code="NoSuchPackage",
            operation="ListObjectsV2",
            key=location.prefix,
        )

    def _package(
        self, reader: _Reader, location: S3Location, name: str, text: bytes
    ) -> RemotePackage:
        import yaml
        from bioimageio.spec import InvalidDescr, build_description
        from bioimageio.spec._internal.io import RelativeFilePath
        from bioimageio.spec._internal.validation_context import ValidationContext
        from bioimageio.spec._package import get_package_content

        where = f"{location.url}{name}"
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ModelError(
                f"{where} is not valid YAML: {' '.join(str(exc).split())[:300]}"
            ) from None
        if not isinstance(data, dict):
            raise ModelError(f"{where} is not a YAML mapping")
        # an empty folder as the root: no path of the description reaches a local file
        empty = self.context.state_dir / "sources" / ".empty"
        empty.mkdir(parents=True, exist_ok=True)
        quiet = {"disable_cache": True, "log_warnings": False, "progressbar": False}
        with ValidationContext(perform_io_checks=False, root=empty, file_name=name, **quiet):
            descr = build_description(data)
            if isinstance(descr, InvalidDescr):
                reason = " ".join(str(descr.validation_summary.format()).split())[:300]
                raise ModelError(f"{where} is not a valid bioimage.io description: {reason}")
            content = get_package_content(descr)
        weights = _weight_names(descr)
        files = []
        for file_name, fd in content.items():
            if isinstance(fd, dict):
                continue
            source = fd.source
            if not isinstance(source, RelativeFilePath):
                raise ModelError(
                    f"{where} names {str(source)[:200]!r} for {file_name!r}: a package in S3 "
                    "must hold every file it names, by a path relative to its folder"
                )
            try:
                relative = safe_relative(str(source))
                if file_name in (".", "..", MANIFEST) or "/" in file_name or "\\" in file_name:
                    raise ValueError(f"{file_name!r} is not a file name")
            except ValueError as exc:
                raise ModelError(f"{where} names a file outside its folder: {exc}") from None
            key = location.key(relative)
            files.append(
                RemoteFile(
                    name=file_name,
                    sha256=None if fd.sha256 is None else str(fd.sha256),
                    open=self._opener(reader, key, file_name, location.url),
                    url=f"s3://{location.bucket}/{key}",
                    weights=file_name in weights,
                )
            )
        rdf_name, rdf = next((k, v) for k, v in content.items() if isinstance(v, dict))
        if not rdf.get("id") and _RESOURCE_ID.fullmatch(location.name):
            rdf["id"] = location.name  # served under its folder's name, as the zoo names ids
        version = getattr(descr, "version", None) or rdf.get("version") or "0"
        return RemotePackage(
            ref=location.url,
            model_id=location.name,
            version=str(version)[:40],
            digest=hashlib.sha256(text).hexdigest(),
            rdf_name=rdf_name,
            rdf=rdf,
            files=files,
            origin=where
            + (f" at {self.settings.endpoint_url}" if self.settings.endpoint_url else ""),
        )

    def _opener(self, reader: _Reader, key: str, name: str, label: str) -> Callable[[], IO[bytes]]:
        def open_file() -> IO[bytes]:
            answer = reader._call(
                "GetObject", key, reader._client.get_object, Bucket=reader.bucket, Key=key
            )
            size = int(answer.get("ContentLength") or 0)
            progress = None
            if size >= _PROGRESS_FROM:
                progress = ProgressLine(self._say, label)
                progress.total = size
                progress.set_description(name)
            return _Stream(answer["Body"], reader, key, progress)  # type: ignore[return-value]

        return open_file

    # ------------------------------------------------------------------ listing
    def _list_root(self, bucket: str, prefix: str) -> list[dict[str, Any]]:
        reader = self._reader(bucket, prefix)
        limit = self.settings.max_listed
        names: list[str] = []
        paginator = reader._client.get_paginator("list_objects_v2")
        start = f"{prefix}/" if prefix else ""
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=start, Delimiter="/"):
                for sub in page.get("CommonPrefixes", []):
                    names.append(str(sub["Prefix"]).rstrip("/").rsplit("/", 1)[-1])
                if len(names) >= limit:
                    break
        except ERRORS as exc:
            raise reader._error(exc, "ListObjectsV2", start) from exc
        if len(names) > limit:
            self._say(
                f"{SECTION}: {start or bucket} has more than {limit} folders; listing {limit} (max_listed)"
            )
        names = [n for n in names[:limit] if _ID.fullmatch(n)]
        with ThreadPoolExecutor(max_workers=self.settings.max_concurrency) as pool:
            found = list(
                pool.map(
                    lambda n: self._entry(reader, S3Location(bucket, f"{start}{n}".strip("/"))),
                    names,
                )
            )
        return [e for e in found if e is not None]

    def _entry(self, reader: _Reader, location: S3Location) -> dict[str, Any] | None:
        """A listing entry for one folder (None: no model description there)."""
        import yaml

        for name in DESCRIPTION_NAMES:
            try:
                text = reader.get(location.key(name), limit=MAX_DESCRIPTION_BYTES)
            except S3SourceError as exc:
                if exc.code in ("NoSuchKey", "404", "NotFound"):
                    continue
                if exc.code in CONNECTION_CODES:
                    raise
                log.warning("%s: %s", SECTION, exc)
                return None
            if len(text) > MAX_DESCRIPTION_BYTES:
                return None
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError:
                log.warning("%s: %s%s is not valid YAML; not listed", SECTION, location.url, name)
                return None
            return _summary(location.name, data)
        return None


def _text(value: Any, limit: int) -> str:
    return value[:limit] if isinstance(value, str) else ""


def _summary(model_id: str, data: Any) -> dict[str, Any] | None:
    """id, name, description, tags, versions of a description (plain strings only: nothing
    of a hostile YAML document is expanded)."""
    if not isinstance(data, dict) or data.get("type", "model") != "model":
        return None
    tags = data.get("tags") if isinstance(data.get("tags"), list) else []
    version = data.get("version")
    return {
        "id": model_id,
        "name": _text(data.get("name"), 200) or model_id,
        "description": _text(data.get("description"), 2000),
        "tags": [t[:100] for t in tags[:100] if isinstance(t, str)],
        "versions": [str(version)[:40]] if isinstance(version, (str, int, float)) else [],
    }


def _weight_names(descr: Any) -> set[str]:
    """File names (in the package) of the description's weights."""
    from bioimageio.spec._internal.io import extract_file_name

    names = set()
    for _, entry in getattr(descr, "weights", None) or []:
        if entry is not None and getattr(entry, "source", None) is not None:
            names.add(str(extract_file_name(entry.source)))
    return names


__all__ = ["S3Location", "S3ModelSource", "safe_relative"]
