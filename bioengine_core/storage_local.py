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
    """Publishes each model by copying into a hidden temp dir, then renaming into place."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, name: str) -> Path:
        if not name or "/" in name or name.startswith("."):
            raise StorageError(f"invalid model name {name!r}")
        return self.root / name

    def put(self, name: str, source: Path) -> None:
        target = self._dir(name)
        tmp = self.root / f".{name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            shutil.copytree(source, tmp, symlinks=False)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise StorageError(f"cannot publish {name} to {self.root}: {exc}") from exc
        old = None
        if target.exists():
            old = self.root / f".{name}.{uuid.uuid4().hex[:8]}.old"
            os.rename(target, old)
        os.rename(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def get(self, name: str, dest: Path) -> Path:
        src = self._dir(name)
        if not src.is_dir():
            raise StorageError(f"model {name!r} is not in the repository {self.root}")
        dest = Path(dest)
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return dest

    def list(self) -> list[str]:
        return sorted(
            p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")
        )

    def delete(self, name: str) -> None:
        shutil.rmtree(self._dir(name), ignore_errors=True)

    def location(self) -> RepositoryLocation:
        return RepositoryLocation(uri=str(self.root), local_path=self.root)


def make_local_storage(*, settings: LocalStorageSettings, context: BackendContext) -> LocalStorage:
    """Factory registered for `kind = "local"`."""
    root = (
        context.resolve_path(settings.path) if settings.path else context.state_dir / "repository"
    )
    return LocalStorage(root)
