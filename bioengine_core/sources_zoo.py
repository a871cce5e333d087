"""Remote model sources: `bioimageio:ID[/VERSION]` (BioImage Model Zoo ids), `doi:10.5281/...`
and `https://...` (a description file or a package zip), resolved with bioimageio.spec's own
resolution and download code into the verified cache of `bioengine_core.modelcache`.

Where the zoo lives is configurable (`[sources.bioimageio]`), so a site can point at a mirror:
the spec's `collection_http_pattern`, `id_map` and `id_map_draft`, plus the collection listing
and Zenodo API used for DOIs. bioimageio.spec keeps these in one process-wide settings object,
so a resolve sets them for its duration under a lock (resolves in one process run one at a time).

Size: the three reference kinds share the spec glue and the error wording, kept in one place.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from .contracts import BackendContext, BackendSettings, ModelSource
from .errors import ModelError, UnknownModelError
from .modelcache import ModelCache, ProgressLine, RemoteFile, RemotePackage

_SPEC_LOCK = threading.RLock()
SECTION = "[sources.bioimageio]"


def _http_url(value: str, key: str) -> str:
    if value and not re.match(r"^https?://[^/\s]+", value):
        raise ValueError(f"{key} must be an http:// or https:// URL, got {value!r}")
    return value


class ZooSourceSettings(BackendSettings):
    """`[sources.bioimageio]`: where the model zoo is (defaults: the public zoo) and the cache.
    Also used for `doi:` and `https:` references."""

    kind: str = "bioimageio"
    collection_http_pattern: str = Field(
        "https://hypha.aicell.io/bioimage-io/artifacts/{bioimageio_id}/files/rdf.yaml",
        description="URL of a zoo id's description; '{bioimageio_id}' is replaced by the id.",
    )
    id_map: str = Field(
        "https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io/id_map.json",
        description="The zoo's id map (ids and ID/VERSION to description URLs and sha256).",
    )
    id_map_draft: str = Field(
        "", description="Id map of draft versions ('' to never resolve drafts)."
    )
    collection_url: str = Field(
        "https://uk1s3.embassy.ebi.ac.uk/public-datasets/bioimage.io/collection.json",
        description="The zoo's collection listing (used to find a doi: reference's model).",
    )
    zenodo_api: str = Field(
        "https://zenodo.org/api", description="Zenodo API for DOIs 10.5281/zenodo.N."
    )
    offline: bool = Field(
        False, description="Serve only what is cached (fill it with `bioengine models pull`)."
    )
    cache_dir: str = Field(
        "", description="Cache folder ('' for <engine.state_dir>/sources/bioimageio)."
    )
    http_timeout: float = Field(
        30.0, gt=0, le=3600, description="Seconds without data before a download attempt fails."
    )
    retries: int = Field(
        2, ge=0, le=10, description="Further tries of a failed download (each of 3 attempts)."
    )
    require_weights_sha256: bool = Field(
        True, description="Reject packages whose weights declare no sha256."
    )

    @field_validator("collection_http_pattern")
    @classmethod
    def _pattern(cls, value: str) -> str:
        _http_url(value, "collection_http_pattern")
        if value and "{bioimageio_id}" not in value:
            raise ValueError("collection_http_pattern must contain '{bioimageio_id}'")
        return value

    @field_validator("id_map", "id_map_draft", "collection_url", "zenodo_api")
    @classmethod
    def _urls(cls, value: str, info: Any) -> str:
        return _http_url(value, info.field_name)


def _network_error(exc: BaseException) -> str:
    """'timeout', 'transport' (a dropped or refused connection: retried) or '' for the first
    httpx error in the exception chain. Timeouts are not retried: a slow server costs one try."""
    import httpx

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, httpx.TimeoutException):
            return "timeout"
        if isinstance(seen, httpx.TransportError):
            return "transport"
        seen = seen.__cause__ or seen.__context__
    return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class ZooSource(ModelSource):
    """Resolves remote references into verified package folders of the cache."""

    def __init__(self, settings: ZooSourceSettings, context: BackendContext):
        self.settings = settings
        self.context = context

    # ------------------------------------------------------------------ public
    def cache(self, cache_dir: Path) -> ModelCache:
        """The cache this source uses (the `cache_dir` setting wins over the engine's)."""
        s = self.settings
        root = self.context.resolve_path(s.cache_dir) if s.cache_dir else cache_dir / "bioimageio"
        return ModelCache(root, progress=self._say, require_weights_sha256=s.require_weights_sha256)

    def resolve(self, ref: str, *, cache_dir: Path) -> Path:
        """The verified package folder for `ref` (fetched into the cache unless offline)."""
        ref = ref.strip()
        cache = self.cache(cache_dir)
        if self.settings.offline:
            folder = cache.cached(ref)
            if folder is None:
                raise ModelError(
                    f"{ref} is not in the model cache at {cache.root} and {SECTION} offline = "
                    f"true; fill the cache first with `bioengine models pull {ref}`"
                )
            return folder
        try:
            package = self._describe(ref)
        except ModelError as exc:
            if exc.args and "unreachable" in str(exc) and (folder := cache.cached(ref)):
                self._say(f"{exc}; using the cached copy at {folder}")
                return folder
            raise
        with self._spec_settings(package):
            return cache.store(package)

    def listing(self, *, cache_dir: Path) -> list[dict[str, Any]]:
        """The models of the collection at `collection_url` (for catalog search)."""
        from .zoo_listing import fetch_listing

        s = self.settings
        copy = self.cache(cache_dir).root / "collection.json"
        return fetch_listing(
            s.collection_url, copy, timeout=min(s.http_timeout, 30.0), offline=s.offline
        )

    # ------------------------------------------------------------------ spec glue
    def _say(self, line: str) -> None:
        if self.context.progress is not None:
            self.context.progress(line)

    @contextlib.contextmanager
    def _spec_settings(self, package: Any = None) -> Iterator[None]:
        """bioimageio.spec's process-wide settings pointed at this source's zoo."""
        from bioimageio.spec._internal import io_utils
        from bioimageio.spec._internal._settings import settings as spec

        s = self.settings
        wanted = {
            "collection_http_pattern": s.collection_http_pattern,
            "id_map": s.id_map,
            "id_map_draft": s.id_map_draft or s.id_map,
            "resolve_draft": bool(s.id_map_draft),
            "http_timeout": s.http_timeout,
        }
        with _SPEC_LOCK:
            old = {k: getattr(spec, k) for k in wanted}
            for key, value in wanted.items():
                setattr(spec, key, value)
            io_utils.get_id_map.cache_clear()
            try:
                yield
            finally:
                for key, value in old.items():
                    setattr(spec, key, value)
                io_utils.get_id_map.cache_clear()

    def _spec_source(self, ref: str) -> str:
        scheme, _, rest = ref.partition(":")
        if scheme in ("http", "https"):
            return ref
        rest = rest.strip().strip("/")
        if scheme == "bioimageio":
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?", rest):
                raise ModelError(f"{ref!r}: expected bioimageio:ID or bioimageio:ID/VERSION")
            return rest
        if scheme == "doi":
            return self._doi_url(ref, rest)
        raise ModelError(f"{ref!r}: the zoo source handles bioimageio:, doi: and https: only")

    def _doi_url(self, ref: str, doi: str) -> str:
        """A DOI's description (or zip) URL: from the zoo's collection listing, else from
        Zenodo's records API for `10.5281/zenodo.N`."""
        import httpx

        s = self.settings
        tried = []
        timeout = min(s.http_timeout, 30.0)
        if s.collection_url:
            tried.append(s.collection_url)
            try:
                listing = httpx.get(s.collection_url, timeout=timeout, follow_redirects=True)
                entries = listing.json().get("collection", []) if listing.is_success else []
            except (httpx.HTTPError, ValueError, AttributeError):
                entries = []
            for entry in entries:
                if doi in (entry.get("doi"), entry.get("concept_doi")) and entry.get("rdf_source"):
                    return str(entry["rdf_source"])
        match = re.fullmatch(r"10\.5281/zenodo\.(\d+)", doi)
        if match and s.zenodo_api:
            url = f"{s.zenodo_api.rstrip('/')}/records/{match.group(1)}"
            tried.append(url)
            try:
                record = httpx.get(url, timeout=timeout, follow_redirects=True)
                files = record.json().get("files", []) if record.is_success else []
            except (httpx.HTTPError, ValueError, AttributeError):
                files = []
            by_name = {f.get("key"): f.get("links", {}).get("self") for f in files}
            for name in ("bioimageio.yaml", "rdf.yaml"):
                if by_name.get(name):
                    return str(by_name[name])
            zips = [u for n, u in by_name.items() if str(n).endswith(".zip") and u]
            if zips:
                return str(zips[0])
        raise ModelError(
            f"{ref}: DOI not found in the zoo collection or Zenodo (tried {', '.join(tried)}; "
            f"settings {SECTION} collection_url, zenodo_api)"
        )

    def _describe(self, ref: str) -> RemotePackage:
        """Open the description through bioimageio.spec (with retries on dropped
        connections) and list the files its package holds."""
        source = self._spec_source(ref)
        tries = self.settings.retries + 1
        for attempt in range(tries):
            try:
                with self._spec_settings():
                    return self._open(ref, source)
            except ModelError:
                raise
            except Exception as exc:  # noqa: BLE001 - spec raises many kinds; each named below
                if _network_error(exc) == "transport" and attempt + 1 < tries:
                    self._say(f"{ref}: {_first_line(exc)}; retrying")
                    continue
                raise self._describe_error(ref, source, exc) from None
        raise AssertionError("unreachable")

    def _describe_error(self, ref: str, source: str, exc: Exception) -> ModelError:
        s = self.settings
        if _network_error(exc) == "timeout":
            return ModelError(
                f"{ref}: the zoo did not answer within {s.http_timeout:g} s "
                f"({SECTION} http_timeout)"
            )
        text = str(exc)
        if "not found in" in text or "404" in text:
            where = s.collection_http_pattern.format(bioimageio_id=source)
            return UnknownModelError(
                f"{ref}: no such model in the zoo (not at {where}, not in the id map {s.id_map}; "
                f"settings {SECTION} collection_http_pattern, id_map)"
            )
        if _network_error(exc) == "transport" or "Empty (or unavailable) id map" in text:
            return ModelError(
                f"{ref}: the zoo is unreachable ({_first_line(exc)}); check {SECTION} "
                "collection_http_pattern / id_map, or set offline = true to serve from the cache"
            )
        return ModelError(f"{ref}: cannot read its description: {_first_line(exc)}")

    def _open(self, ref: str, source: str) -> RemotePackage:
        from bioimageio.spec import InvalidDescr, build_description
        from bioimageio.spec._internal.io_utils import open_bioimageio_yaml
        from bioimageio.spec._internal.validation_context import ValidationContext
        from bioimageio.spec._package import get_package_content

        empty = self.context.state_dir / "sources" / ".empty"
        empty.mkdir(parents=True, exist_ok=True)
        quiet = {"disable_cache": True, "log_warnings": False, "progressbar": False}
        # root: an empty folder, so a bare id never resolves to a local file of that name
        with ValidationContext(perform_io_checks=False, root=empty, **quiet):
            opened = open_bioimageio_yaml(source)
        if not isinstance(opened.content, dict):
            raise ModelError(f"{ref}: its description is not a YAML mapping")
        origin = str(opened.original_source_name or source)
        ctx = ValidationContext(
            perform_io_checks=False,
            root=opened.original_root,
            file_name=opened.original_file_name,
            **quiet,
        )
        with ctx:
            descr = build_description(opened.content)
            if isinstance(descr, InvalidDescr):
                reason = " ".join(str(descr.validation_summary.format()).split())[:300]
                raise ModelError(f"{ref}: its description ({origin}) is not valid: {reason}")
            content = get_package_content(descr)
        weight_names = self._weight_names(descr)
        rdf_name, rdf = next((k, v) for k, v in content.items() if isinstance(v, dict))
        files = [
            RemoteFile(
                name=name,
                sha256=None if fd.sha256 is None else str(fd.sha256),
                open=self._opener(ref, name, fd, opened.original_root),
                url=str(fd.source),
                weights=name in weight_names,
            )
            for name, fd in content.items()
            if not isinstance(fd, dict)
        ]
        text = opened.unparsed_content.encode()
        return RemotePackage(
            ref=ref,
            model_id=str(getattr(descr, "id", None) or source.split("/")[0])[:80],
            version=str(getattr(descr, "version", None) or "0"),
            digest=hashlib.sha256(text).hexdigest(),
            rdf_name=rdf_name,
            rdf=rdf,
            files=files,
            origin=origin,
        )

    @staticmethod
    def _weight_names(descr: Any) -> set[str]:
        from bioimageio.spec._internal.io import extract_file_name

        names = set()
        weights = getattr(descr, "weights", None)
        for _, entry in weights or []:
            if entry is not None and getattr(entry, "source", None) is not None:
                names.add(str(extract_file_name(entry.source)))
        return names

    def _opener(self, ref: str, name: str, fd: Any, root: Any) -> Any:
        """Open one listed file with bioimageio.spec's reader: downloads with progress lines,
        retries on a dropped connection, one clear error otherwise."""
        from bioimageio.spec._internal.io import get_reader
        from bioimageio.spec._internal.validation_context import ValidationContext

        def open_file() -> Any:
            timeout = self.settings.http_timeout
            tries = self.settings.retries + 1
            url = _url_of(fd)
            for attempt in range(tries):
                started = time.monotonic()
                try:
                    with ValidationContext(
                        root=root,
                        disable_cache=True,
                        perform_io_checks=False,
                        log_warnings=False,
                        progressbar=lambda: ProgressLine(self._say, ref),
                    ):
                        # the cache checks the sha256 itself (naming the file); ask for none here
                        return get_reader(fd.source, sha256=None)
                except Exception as exc:  # noqa: BLE001
                    # bioimageio.spec's fetch makes 3 attempts and then reports only that they
                    # are exhausted; the time taken tells timeouts apart, a HEAD request 404s
                    gave_up = "retries exhausted" in str(exc)
                    elapsed = time.monotonic() - started
                    if _network_error(exc) == "timeout" or (gave_up and elapsed >= 2.5 * timeout):
                        raise ModelError(
                            f"{ref}: downloading {name} from {url} took longer than "
                            f"{timeout:g} s without data, 3 times ({SECTION} http_timeout)"
                        ) from None
                    status = _status(url, timeout) if gave_up and url else None
                    if status is not None and status >= 400:
                        raise ModelError(
                            f"{ref}: cannot download {name}: {url} answers HTTP {status}"
                        ) from None
                    cause = "the connection failed 3 times" if gave_up else _first_line(exc)
                    if (gave_up or _network_error(exc) == "transport") and attempt + 1 < tries:
                        self._say(f"{ref}: {name}: {cause}; retrying")
                        continue
                    raise ModelError(
                        f"{ref}: cannot download {name} from {url}: {cause}"
                        + (f" (after {tries} tries, {SECTION} retries)" if tries > 1 else "")
                    ) from None
            raise AssertionError("unreachable")

        return open_file


def _url_of(fd: Any) -> str:
    """The http(s) URL a file descriptor downloads from ('' for a file inside a zip)."""
    text = str(fd.source.absolute() if hasattr(fd.source, "absolute") else fd.source)
    return text if text.startswith(("http://", "https://")) else ""


def _status(url: str, timeout: float) -> int | None:
    """The HTTP status a HEAD request for `url` gets (None when there is no answer)."""
    import httpx

    try:
        return httpx.head(url, timeout=timeout, follow_redirects=True).status_code
    except httpx.HTTPError:
        return None


__all__ = ["ZooSource", "ZooSourceSettings"]
