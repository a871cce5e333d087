"""A verified, content-addressed cache of model packages fetched from remote sources.

A package lands in `ROOT/packages/<id>-<version>-<digest>` (digest: sha256 of its description
text) only after every file has been written to a temporary folder next to it and checked
against the sha256 its description declares; then the folder is renamed into place in one step.
A mismatch, a dropped download or any other failure removes the temporary folder, so a package
is either complete and verified under its final name or absent. A file lock per package makes
two processes (two `serve`s sharing a cache) fetch it once; the second finds it in place.

Every use re-hashes the files against the package's manifest (`.bioengine-manifest.json`),
so a cached copy changed on disk is caught too. `refs/` remembers which package a reference
last resolved to: offline mode serves from it without any network access.

The cache knows nothing about the zoo: sources hand it a `RemotePackage` (what to fetch and
how); see `bioengine_core.sources_zoo`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import yaml

from .errors import ModelError

MANIFEST = ".bioengine-manifest.json"
CHUNK = 1 << 20


@dataclass
class RemoteFile:
    """One file a description lists: its name in the package, declared sha256 (None when the
    description declares none) and how to open it (a binary reader; may download)."""

    name: str
    sha256: str | None
    open: Callable[[], IO[bytes]]
    url: str = ""
    weights: bool = False


@dataclass
class RemotePackage:
    """A package as a source found it: identity, the description to write and its files."""

    ref: str
    model_id: str
    version: str
    digest: str
    """sha256 of the description as served (the cache key)."""
    rdf_name: str
    rdf: dict[str, Any]
    files: list[RemoteFile] = field(default_factory=list)
    origin: str = ""

    @property
    def key(self) -> str:
        return package_key(self.model_id, self.version, self.digest)


def package_key(model_id: str, version: str, digest: str) -> str:
    """Folder name of a package: readable id and version, then the description's digest."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{model_id}-{version}").strip("._") or "model"
    return f"{safe[:80]}-{digest[:16]}"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def human_size(size: float) -> str:
    """`1.8 MB` style sizes for progress lines."""
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


class ModelCache:
    """The cache under `root`; `progress` receives one-line messages for the operator."""

    def __init__(
        self,
        root: Path,
        *,
        progress: Callable[[str], None] | None = None,
        require_weights_sha256: bool = True,
        section: str = "[sources.bioimageio]",
    ):
        self.root = Path(root)
        self.packages = self.root / "packages"
        self.refs = self.root / "refs"
        self.locks = self.root / "locks"
        self.progress = progress or (lambda line: None)
        self.require_weights_sha256 = require_weights_sha256
        self.section = section
        """The settings section errors name (the source's, which holds `require_weights_sha256`)."""

    # ------------------------------------------------------------------ lookups
    def cached(self, ref: str) -> Path | None:
        """The verified package folder `ref` last resolved to, or None if not cached."""
        record = self._ref_file(ref)
        try:
            key = json.loads(record.read_text())["package"]
        except (OSError, ValueError, KeyError):
            return None
        folder = self.packages / key
        if not folder.is_dir():
            return None
        self.verify(folder)
        return folder

    def verify(self, folder: Path) -> None:
        """Re-hash every file of a cached package against its manifest; ModelError naming the
        first file that is missing or changed."""
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise ModelError(f"cached package {folder} has no readable manifest: {exc}") from None
        for name, expected in manifest.get("files", {}).items():
            path = folder / name
            if not path.is_file():
                raise ModelError(f"cached package {folder}: file {name!r} is missing")
            actual = sha256_file(path)
            if actual != expected:
                raise ModelError(
                    f"cached package {folder}: file {name!r} changed on disk (sha256 {actual}, "
                    f"recorded {expected}); remove the folder and fetch it again"
                )

    def entries(self) -> list[dict[str, Any]]:
        """Every cached package's manifest (for listings)."""
        out = []
        for manifest in sorted(self.packages.glob(f"*/{MANIFEST}")):
            with contextlib.suppress(OSError, ValueError):
                out.append({**json.loads(manifest.read_text()), "path": str(manifest.parent)})
        return out

    # ------------------------------------------------------------------ storing
    def store(self, package: RemotePackage) -> Path:
        """The verified folder of `package`: reused when already cached (and still intact),
        otherwise fetched, verified and renamed into place under a lock."""
        final = self.packages / package.key
        with self._lock(package.key):
            if final.is_dir():
                try:
                    self.verify(final)
                except ModelError as exc:
                    self.progress(f"{exc}; fetching it again")
                    self._discard(final)
                else:
                    self._remember(package.ref, package.key)
                    return final
            self._clean_stale(package.key)
            tmp = self.packages / f".tmp-{package.key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            try:
                manifest = self._fill(tmp, package)
                (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
                os.rename(tmp, final)
            finally:
                if tmp.exists():
                    self._discard(tmp)
            self._remember(package.ref, package.key)
        return final

    def _fill(self, tmp: Path, package: RemotePackage) -> dict[str, Any]:
        files: dict[str, str] = {}
        undeclared: list[str] = []
        total = 0
        for remote in package.files:
            if remote.sha256 is None and remote.weights and self.require_weights_sha256:
                raise ModelError(
                    f"{package.ref}: the description declares no sha256 for weights file "
                    f"{remote.name!r}, so it cannot be verified (set {self.section} "
                    "require_weights_sha256 = false to accept such packages)"
                )
            target = tmp / remote.name
            target.parent.mkdir(parents=True, exist_ok=True)
            actual, size = self._write(remote, target)
            if remote.sha256 is not None and actual != remote.sha256.lower():
                raise ModelError(
                    f"{package.ref}: file {remote.name!r} does not match its sha256 "
                    f"(expected {remote.sha256}, got {actual}"
                    + (f", from {remote.url}" if remote.url else "")
                    + "); the package was rejected and nothing of it is cached"
                )
            if remote.sha256 is None:
                undeclared.append(remote.name)
            files[remote.name] = actual
            total += size
        rdf_path = tmp / package.rdf_name
        rdf_path.write_text(yaml.safe_dump(package.rdf, sort_keys=False, allow_unicode=True))
        files[package.rdf_name] = sha256_file(rdf_path)
        self.progress(
            f"{package.ref}: {len(package.files)} files, {human_size(total)}, sha256 verified"
            + (f" ({len(undeclared)} without a declared sha256)" if undeclared else "")
        )
        return {
            "ref": package.ref,
            "id": package.model_id,
            "version": package.version,
            "description_sha256": package.digest,
            "origin": package.origin,
            "fetched_at": time.time(),
            "files": files,
            "undeclared_sha256": undeclared,
        }

    def _write(self, remote: RemoteFile, target: Path) -> tuple[str, int]:
        digest = hashlib.sha256()
        size = 0
        src = remote.open()
        try:
            with target.open("wb") as dst:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
        finally:
            with contextlib.suppress(Exception):
                src.close()
        return digest.hexdigest(), size

    # ------------------------------------------------------------------ bookkeeping
    def _ref_file(self, ref: str) -> Path:
        return self.refs / f"{hashlib.sha256(ref.encode()).hexdigest()[:32]}.json"

    def _remember(self, ref: str, key: str) -> None:
        self.refs.mkdir(parents=True, exist_ok=True)
        record = self._ref_file(ref)
        tmp = record.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"ref": ref, "package": key, "at": time.time()}))
        os.replace(tmp, record)

    @contextlib.contextmanager
    def _lock(self, key: str) -> Iterator[None]:
        self.locks.mkdir(parents=True, exist_ok=True)
        self.packages.mkdir(parents=True, exist_ok=True)
        with (self.locks / f"{key}.lock").open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _clean_stale(self, key: str) -> None:
        """Temporary folders of this package left by a killed process (we hold its lock, so
        no live process is writing one)."""
        for stale in self.packages.glob(f".tmp-{key}-*"):
            self._discard(stale)

    def _discard(self, folder: Path) -> None:
        trash = folder.with_name(f".trash-{uuid.uuid4().hex[:8]}")
        with contextlib.suppress(OSError):
            os.rename(folder, trash)
            folder = trash
        shutil.rmtree(folder, ignore_errors=True)


class ProgressLine:
    """A tqdm-like progress bar (what bioimageio.spec's downloads drive) that reports one line
    per file through `say`: its size when known, a percentage at most every `interval` seconds
    for long downloads, and nothing per chunk."""

    def __init__(self, say: Callable[[str], None], label: str, interval: float = 5.0):
        self.say = say
        self.label = label
        self.interval = interval
        self.total: int | None = 0
        self.n = 0
        self.name = ""
        self._last = time.monotonic()
        self._done = False

    def set_description(self, desc: str) -> None:
        self.name = desc.removeprefix("Downloading ").strip()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.total and now - self._last >= self.interval and self.n < self.total:
            self._last = now
            pct = 100 * self.n // self.total
            self.say(f"{self.label}: {self.name} {pct}% of {human_size(self.total)}")

    def reset(self, total: int | None = None) -> None:
        self.n = 0

    def close(self) -> None:
        if not self._done:
            self._done = True
            size = human_size(self.total or self.n)
            self.say(f"{self.label}: downloaded {self.name} ({size})")


__all__ = [
    "ModelCache",
    "ProgressLine",
    "RemoteFile",
    "RemotePackage",
    "human_size",
    "package_key",
    "sha256_file",
]
