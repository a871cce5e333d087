"""Built-in storage: the model repository is a directory on this host (or a shared filesystem)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from pydantic import Field

from .contracts import BackendContext, BackendSettings, RepositoryLocation, Storage
from .errors import StorageError


class LocalStorageSettings(BackendSettings):
    """`[storage] kind = "local"`: a directory readable by every replica."""

    kind: str = "local"
    path: str | None = Field(
        None,
        description="Repository directory (default: STATE_DIR/repository). On a cluster, "
        "a shared filesystem path that compute nodes see at the same location.",
    )


class LocalStorage(Storage):
    """Each model is a symlink `NAME -> .NAME.<id>.v`, an immutable version directory.

    `put` copies into a new hidden version directory and swaps the symlink with one atomic
    rename, so Triton and concurrent `get` calls always see one complete version; the old
    version is removed afterwards. (A plain directory `NAME` from older layouts is replaced too.)
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise StorageError(f"invalid model name {name!r}")
        return self.root / name

    def _version(self, path: Path) -> Path | None:
        """The version directory `path` links to (None for a plain directory or nothing)."""
        try:
            return self.root / os.readlink(path)
        except OSError:
            return None

    def put(self, name: str, source: Path) -> None:
        target = self._dir(name)
        tag = uuid.uuid4().hex[:8]
        version = self.root / f".{name}.{tag}.v"
        try:
            shutil.copytree(source, version, symlinks=False)
        except OSError as exc:
            shutil.rmtree(version, ignore_errors=True)
            raise StorageError(f"cannot publish {name} to {self.root}: {exc}") from exc
        link = self.root / f".{name}.{tag}.lnk"
        os.symlink(version.name, link)
        old_version = self._version(target)
        old_dir = None
        if old_version is None and target.is_dir() and not target.is_symlink():
            old_dir = self.root / f".{name}.{tag}.old"
            os.rename(target, old_dir)
        os.replace(link, target)
        for old in (old_version, old_dir):
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)

    def get(self, name: str, dest: Path) -> Path:
        src = self._dir(name)
        dest = Path(dest)
        for _ in range(20):
            version = self._version(src) or src
            if not version.is_dir():
                raise StorageError(f"model {name!r} is not in the repository {self.root}")
            tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                shutil.copytree(version, tmp)
                # Versions are immutable and only removed after the link moved away from them:
                # an unchanged link means the copy is one complete version.
                if (self._version(src) or src) == version:
                    shutil.copytree(tmp, dest, dirs_exist_ok=True)
                    return dest
            except OSError:
                pass  # the version was replaced while being read: read the new one
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(f"model {name!r} kept changing while being read from {self.root}")

    def list(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def delete(self, name: str) -> None:
        path = self._dir(name)
        version = self._version(path)
        if version is not None:
            path.unlink(missing_ok=True)
            shutil.rmtree(version, ignore_errors=True)
        else:
            shutil.rmtree(path, ignore_errors=True)

    def location(self) -> RepositoryLocation:
        return RepositoryLocation(uri=str(self.root), local_path=self.root)


def make_local_storage(*, settings: LocalStorageSettings, context: BackendContext) -> LocalStorage:
    """Factory registered for `kind = "local"`."""
    root = (
        context.resolve_path(settings.path) if settings.path else context.state_dir / "repository"
    )
    return LocalStorage(root)
