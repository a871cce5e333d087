"""Built-in model sources: a package folder (`folder:PATH` or a plain path), a zip file, and
the packages shipped with BioEngine (`bundled:NAME`)."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

from .contracts import BackendContext, BackendSettings, ModelSource
from .errors import ModelError
from .util import find_rdf


def split_ref(ref: str) -> tuple[str, str]:
    """`scheme:rest` → (scheme, rest); a bare path is `folder:` (or `zip:` if it ends in .zip)."""
    if "://" in ref:
        scheme, rest = ref.split("://", 1)
        return scheme, rest
    head, sep, rest = ref.partition(":")
    if sep and head.isidentifier() and len(head) > 1:
        return head, rest
    return ("zip" if ref.endswith(".zip") else "folder"), ref


class FolderSourceSettings(BackendSettings):
    """`[sources.folder]`: no options."""

    kind: str = "folder"


class BundledSourceSettings(BackendSettings):
    """`[sources.bundled]`: no options."""

    kind: str = "bundled"


class ZipSourceSettings(BackendSettings):
    """`[sources.zip]`: no options."""

    kind: str = "zip"


class FolderSource(ModelSource):
    """A directory that holds a bioimage.io package."""

    def __init__(self, context: BackendContext):
        self.context = context

    def resolve(self, ref: str, *, cache_dir: Path) -> Path:
        _, rest = split_ref(ref)
        folder = self.context.resolve_path(rest)
        if folder.is_file() and folder.name.endswith(".yaml"):
            folder = folder.parent
        if not folder.is_dir():
            raise ModelError(f"model folder not found: {folder} (from {ref!r})")
        find_rdf(folder)
        return folder


class BundledSource(ModelSource):
    """A package shipped with BioEngine (`bundled:unet2d_nuclei_broad`)."""

    def resolve(self, ref: str, *, cache_dir: Path) -> Path:
        from .bundled import bundled_path

        _, name = split_ref(ref)
        return bundled_path(name.strip())


class ZipSource(ModelSource):
    """A zipped bioimage.io package, unpacked once into the cache (keyed by its content hash)."""

    def __init__(self, context: BackendContext):
        self.context = context

    def resolve(self, ref: str, *, cache_dir: Path) -> Path:
        _, rest = split_ref(ref)
        archive = self.context.resolve_path(rest)
        if not archive.is_file():
            raise ModelError(f"model archive not found: {archive} (from {ref!r})")
        digest = hashlib.sha256(archive.read_bytes()).hexdigest()[:16]
        target = cache_dir / "zip" / digest
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            try:
                with zipfile.ZipFile(archive) as zf:
                    zf.extractall(tmp)
            except zipfile.BadZipFile as exc:
                raise ModelError(f"{archive} is not a zip file: {exc}") from exc
            tmp.rename(target)
        find_rdf(target)
        return target
