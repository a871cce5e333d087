"""Storage conformance suite: importable pytest tests that every storage plugin must pass.

How to use it in a plugin's own tests::

    # plugins/storage_s3/tests/test_conformance.py
    import pytest
    from bioengine_core.testing.storage import StorageConformance
    from bioengine_storage_s3 import S3Storage, S3StorageSettings


    class TestS3Storage(StorageConformance):
        @pytest.fixture
        def storage(self, s3_endpoint, tmp_path):
            settings = S3StorageSettings(endpoint_url=s3_endpoint, bucket="models",
                                         prefix=tmp_path.name, create_bucket=True)
            store = S3Storage(settings)
            yield store          # each test gets an empty repository (a fresh prefix)
            store.close()

The subclass name must start with `Test`. The one fixture to provide is `storage`: an empty
repository (a fresh prefix or directory per test). The suite publishes small model directories
(nested files, binary content), reads them back with `get()`, replaces them, deletes them, and
checks `location()`; `get()` of an absent model must raise `errors.StorageError`. Set
`concurrent_rounds = 0` on the subclass to skip the (slower) concurrent replace/read test.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import ClassVar

import pytest

from ..contracts import RepositoryLocation, Storage
from ..errors import StorageError


def write_model(root: Path, files: dict[str, bytes]) -> Path:
    """Create a model directory under `root` holding `files` (relative path -> content)."""
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    """All files below `root` as relative POSIX path -> content."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


VERSION_1 = {
    "config.pbtxt": b'name: "m"\nbackend: "python"\n',
    "1/model.py": b"# version one\n",
    "1/weights.bin": bytes(range(256)) * 64,
}
VERSION_2 = {
    "config.pbtxt": b'name: "m"\nbackend: "onnxruntime"\n',
    "1/model.onnx": b"\x08\x07" * 5000,
}


class StorageConformance:
    """Tests of the `contracts.Storage` contract; subclass it as `Test...` with a `storage` fixture."""

    concurrent_rounds: ClassVar[int] = 10
    """How many replacements the concurrent test performs while a reader calls `get()`."""

    @pytest.fixture
    def sources(self, tmp_path: Path) -> dict[str, Path]:
        """Two versions of a model directory on disk, to publish."""
        return {
            "v1": write_model(tmp_path / "src-v1", VERSION_1),
            "v2": write_model(tmp_path / "src-v2", VERSION_2),
        }

    def test_empty_storage_lists_nothing(self, storage: Storage) -> None:
        """A fresh repository has no models."""
        assert storage.list() == []

    def test_put_get_round_trip(self, storage: Storage, sources, tmp_path: Path) -> None:
        """A published directory comes back byte for byte, nested files included."""
        storage.put("alpha", sources["v1"])
        dest = storage.get("alpha", tmp_path / "out")
        assert Path(dest).is_dir()
        assert read_tree(Path(dest)) == VERSION_1

    def test_list_is_sorted_names(self, storage: Storage, sources) -> None:
        """list() returns exactly the published names, sorted, without temporary entries."""
        for name in ("zeta", "alpha", "mid"):
            storage.put(name, sources["v1"])
        assert storage.list() == ["alpha", "mid", "zeta"]

    def test_put_replaces_whole_model(self, storage: Storage, sources, tmp_path: Path) -> None:
        """Publishing again replaces the old version entirely: no file of it survives."""
        storage.put("alpha", sources["v1"])
        storage.put("alpha", sources["v2"])
        assert read_tree(storage.get("alpha", tmp_path / "out")) == VERSION_2
        assert storage.list() == ["alpha"]

    def test_replace_is_atomic_for_readers(self, storage: Storage, sources, tmp_path) -> None:
        """While a model is replaced repeatedly, every get() sees one complete version."""
        if self.concurrent_rounds <= 0:
            pytest.skip("concurrent_rounds = 0")
        storage.put("alpha", sources["v1"])
        done = threading.Event()
        seen: list[str] = []
        problems: list[str] = []

        def reader() -> None:
            n = 0
            while not done.is_set():
                n += 1
                try:
                    tree = read_tree(storage.get("alpha", tmp_path / f"read-{n}"))
                except StorageError as exc:
                    problems.append(f"get() failed during a replace: {exc}")
                    continue
                except OSError as exc:
                    problems.append(f"get() raised {type(exc).__name__} (not StorageError): {exc}")
                    continue
                if tree == VERSION_1:
                    seen.append("v1")
                elif tree == VERSION_2:
                    seen.append("v2")
                else:
                    problems.append(f"get() returned a mix of versions: {sorted(tree)}")

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        try:
            for i in range(self.concurrent_rounds):
                storage.put("alpha", sources["v2" if i % 2 == 0 else "v1"])
        finally:
            done.set()
            thread.join(timeout=60)
        assert not problems, problems[:3]
        assert storage.list() == ["alpha"]

    def test_get_absent_raises_storage_error(self, storage: Storage, tmp_path: Path) -> None:
        """get() of a model that was never published raises StorageError."""
        with pytest.raises(StorageError):
            storage.get("never-published", tmp_path / "out")

    def test_delete_removes_and_is_idempotent(self, storage: Storage, sources, tmp_path) -> None:
        """delete() removes the model; deleting it again, or a name never published, is fine."""
        storage.put("alpha", sources["v1"])
        storage.put("beta", sources["v2"])
        storage.delete("alpha")
        assert storage.list() == ["beta"]
        with pytest.raises(StorageError):
            storage.get("alpha", tmp_path / "out")
        storage.delete("alpha")
        storage.delete("never-published")
        assert storage.list() == ["beta"]

    def test_location_is_usable(self, storage: Storage, sources) -> None:
        """location() names the repository; a local_path, if given, holds the published model."""
        storage.put("alpha", sources["v1"])
        loc = storage.location()
        assert isinstance(loc, RepositoryLocation)
        assert isinstance(loc.uri, str) and loc.uri, "location().uri is empty"
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in loc.env.items())
        if loc.local_path is not None:
            model = Path(loc.local_path) / "alpha"
            assert model.is_dir(), f"{model} missing although location().local_path is set"
            assert read_tree(model) == VERSION_1
