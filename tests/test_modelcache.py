"""The verified cache on its own: nothing unverified or half-written is ever used or left under
a package's final name, a copy changed on disk is caught, and killed writers leave no trace."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest

from bioengine_core.errors import ModelError
from bioengine_core.modelcache import MANIFEST, ModelCache, RemoteFile, RemotePackage


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file(name: str, data: bytes, *, declared: bytes | None = None, weights: bool = False):
    return RemoteFile(
        name=name,
        sha256=_sha(data if declared is None else declared),
        open=lambda: io.BytesIO(data),
        weights=weights,
    )


def _package(files: list[RemoteFile], ref: str = "bioimageio:m", digest: str = "ab" * 32):
    return RemotePackage(
        ref=ref,
        model_id="m",
        version="1",
        digest=digest,
        rdf_name="rdf.yaml",
        rdf={"id": "m", "weights": {"onnx": {"source": "w.onnx"}}},
        files=files,
    )


def _names(cache: ModelCache) -> list[str]:
    return sorted(p.name for p in cache.packages.iterdir()) if cache.packages.exists() else []


def test_a_stored_package_is_complete_and_found_again_by_its_reference(tmp_path):
    lines: list[str] = []
    cache = ModelCache(tmp_path, progress=lines.append)
    folder = cache.store(_package([_file("w.onnx", b"weights", weights=True)]))
    assert folder.name == "m-1-abababababababab"
    assert (folder / "w.onnx").read_bytes() == b"weights"
    assert (folder / "rdf.yaml").is_file() and (folder / MANIFEST).is_file()
    assert cache.cached("bioimageio:m") == folder
    assert cache.cached("bioimageio:other") is None
    assert lines == ["bioimageio:m: 1 files, 7 B, sha256 verified"]


def test_a_mismatching_file_rejects_the_package_and_leaves_nothing(tmp_path):
    cache = ModelCache(tmp_path)
    good = _file("a.npy", b"fine")
    bad = _file("w.onnx", b"tampered", declared=b"original", weights=True)
    with pytest.raises(ModelError, match=r"bioimageio:m: file 'w.onnx' does not match its sha256"):
        cache.store(_package([good, bad]))
    assert _names(cache) == []
    assert cache.cached("bioimageio:m") is None


def test_a_download_failing_halfway_leaves_nothing(tmp_path):
    cache = ModelCache(tmp_path)

    def broken():
        raise ModelError("bioimageio:m: cannot download w.onnx: connection dropped")

    with pytest.raises(ModelError, match="connection dropped"):
        cache.store(_package([_file("a.npy", b"x"), RemoteFile("w.onnx", "0" * 64, broken)]))
    assert _names(cache) == []


def test_weights_without_a_declared_sha256_are_refused_unless_allowed(tmp_path):
    undeclared = RemoteFile("w.onnx", None, lambda: io.BytesIO(b"w"), weights=True)
    with pytest.raises(ModelError, match=r"no sha256 for weights file 'w.onnx'.*require_weights"):
        ModelCache(tmp_path).store(_package([undeclared]))
    lenient = ModelCache(tmp_path, require_weights_sha256=False)
    folder = lenient.store(_package([undeclared]))
    assert (folder / "w.onnx").read_bytes() == b"w"


def test_a_cached_file_changed_on_disk_is_caught_and_fetched_again(tmp_path):
    lines: list[str] = []
    cache = ModelCache(tmp_path, progress=lines.append)
    package = _package([_file("w.onnx", b"weights", weights=True)])
    folder = cache.store(package)
    (folder / "w.onnx").write_bytes(b"changed")
    with pytest.raises(ModelError, match=r"file 'w.onnx' changed on disk"):
        cache.cached("bioimageio:m")
    assert cache.store(package) == folder
    assert (folder / "w.onnx").read_bytes() == b"weights"
    assert any("changed on disk" in line and "fetching it again" in line for line in lines)


def test_temporary_folders_of_a_killed_writer_are_removed(tmp_path):
    cache = ModelCache(tmp_path)
    package = _package([_file("w.onnx", b"weights", weights=True)])
    stale = cache.packages / f".tmp-{package.key}-99999-deadbeef"
    stale.mkdir(parents=True)
    (stale / "w.onnx").write_bytes(b"half")
    cache.store(package)
    assert _names(cache) == [package.key]


def test_two_descriptions_of_one_id_get_two_entries(tmp_path):
    cache = ModelCache(tmp_path)
    one = cache.store(_package([_file("w.onnx", b"1", weights=True)], digest="11" * 32))
    two = cache.store(_package([_file("w.onnx", b"2", weights=True)], digest="22" * 32))
    assert one != two
    assert cache.cached("bioimageio:m") == two, "the reference follows the latest resolve"
    assert Path(one, "w.onnx").read_bytes() == b"1"
