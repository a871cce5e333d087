"""`[sources.s3]`: bioimage.io packages read from a real S3 server (SeaweedFS) into the core's
verified cache: `s3://BUCKET/PREFIX/` and catalog ids `s3:NAME`, tampered objects rejected with
nothing cached, clear errors for missing packages and refused keys, the catalog listing, the
preflight, and `bioengine serve` answering a request with the package's test output."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from bioengine_storage_s3 import S3ModelSource, S3SourceSettings
from core_helpers import Serve, free_port, get_status, run_cli, triton_available

from bioengine_core.bundled import bundled_path
from bioengine_core.contracts import BackendContext
from bioengine_core.errors import ModelError, UnknownModelError
from bioengine_core.modelpkg import load_package
from bioengine_core.testing.pytest_plugin import require_service
from bioengine_core.testing.zoo import _add_hashes

pytestmark = pytest.mark.s3

TINY = bundled_path("tiny_affine")


def package_files(edit: Callable[[dict], None] | None = None) -> dict[str, bytes]:
    """tiny_affine's files with the sha256 of every packaged file in its rdf.yaml (as the zoo's
    upload writes them); `edit(description)` may change the description first."""
    files = {p.name: p.read_bytes() for p in sorted(TINY.iterdir()) if p.is_file()}
    files.pop("generate.py", None)
    data = yaml.safe_load(files.pop("bioimageio.yaml"))
    _add_hashes(data, files)
    if edit is not None:
        edit(data)
    files["rdf.yaml"] = yaml.safe_dump(data, sort_keys=False).encode()
    return files


@pytest.fixture
def bucket(seaweed: Any, prefix: str) -> Iterator[Callable[..., str]]:
    """`upload(folder, files)` puts files under `PREFIX/folder/` of the test bucket and returns
    that key prefix; everything under PREFIX is deleted afterwards."""
    client = seaweed.client()
    try:
        client.create_bucket(Bucket=seaweed.bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass

    def upload(folder: str, files: dict[str, bytes]) -> str:
        for name, data in files.items():
            client.put_object(Bucket=seaweed.bucket, Key=f"{prefix}/{folder}/{name}", Body=data)
        return f"{prefix}/{folder}"

    yield upload
    client.close()
    seaweed.empty(prefix)


def make_source(
    server: Any, tmp_path: Path, root: str = "", lines: list[str] | None = None, **extra: Any
) -> S3ModelSource:
    """The source as the core builds it from `[sources.s3]`, credentials from variables."""
    settings = S3SourceSettings(
        endpoint_url=server.endpoint,
        access_key_id=server.access_key,
        secret_access_key=server.secret_key,
        root=root,
        **extra,
    )
    context = BackendContext(
        deployment="s3src",
        state_dir=tmp_path / "state",
        config_dir=tmp_path,
        progress=(lines.append if lines is not None else None),
    )
    return S3ModelSource(settings, context)


def cached_packages(tmp_path: Path) -> list[str]:
    """Every entry of the source's cache folder of packages (temporary ones included)."""
    packages = tmp_path / "cache" / "s3" / "packages"
    return sorted(p.name for p in packages.iterdir()) if packages.exists() else []


def test_a_package_resolves_verified_by_url_and_by_catalog_id(seaweed, bucket, prefix, tmp_path):
    files = package_files()
    key = bucket("models/tiny-affine", files)
    lines: list[str] = []
    source = make_source(seaweed, tmp_path, f"s3://{seaweed.bucket}/{prefix}/models", lines)
    folder = source.resolve(f"s3://{seaweed.bucket}/{key}/", cache_dir=tmp_path / "cache")
    for name in ("weights.onnx", "test_input.npy", "test_output.npy", "README.md"):
        assert (folder / name).read_bytes() == files[name]
    assert any("sha256 verified" in line for line in lines), lines
    manifest = json.loads((folder / ".bioengine-manifest.json").read_text())
    assert manifest["ref"] == f"s3://{seaweed.bucket}/{key}/"
    assert manifest["undeclared_sha256"] == ["README.md"]  # documentation has no sha256 field
    # catalog mode's form names the same folder below root: the same cached package
    assert source.resolve("s3:tiny-affine", cache_dir=tmp_path / "cache") == folder
    # and the description's file itself may be named
    named = source.resolve(f"s3://{seaweed.bucket}/{key}/rdf.yaml", cache_dir=tmp_path / "cache")
    assert named == folder
    package = load_package(folder)
    assert package.id == "tiny-affine"  # the folder's name: the description has no id
    source.close()


def test_a_tampered_object_is_rejected_naming_the_file_and_nothing_is_cached(
    seaweed, bucket, prefix, tmp_path
):
    files = package_files()
    files["weights.onnx"] = files["weights.onnx"][:-1] + b"\x00"  # after the hash was taken
    key = bucket("models/tampered", files)
    source = make_source(seaweed, tmp_path)
    with pytest.raises(ModelError) as info:
        source.resolve(f"s3://{seaweed.bucket}/{key}", cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert "'weights.onnx' does not match its sha256" in message
    assert f"s3://{seaweed.bucket}/{key}/weights.onnx" in message
    assert "nothing of it is cached" in message
    assert cached_packages(tmp_path) == []  # no package, no temporary folder


def test_a_missing_package_names_the_bucket_and_prefix(seaweed, bucket, prefix, tmp_path):
    bucket("models/no-description", {"weights.onnx": b"x"})
    source = make_source(seaweed, tmp_path, f"s3://{seaweed.bucket}/{prefix}/models")
    with pytest.raises(UnknownModelError) as info:
        source.resolve("s3:ghost", cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert f"no model package at s3://{seaweed.bucket}/{prefix}/models/ghost/" in message
    assert f"bucket '{seaweed.bucket}', prefix '{prefix}/models/ghost/'" in message
    assert "[sources.s3] root" in message
    with pytest.raises(UnknownModelError) as info:
        source.resolve("s3:no-description", cache_dir=tmp_path / "cache")
    assert "no bioimageio.yaml or rdf.yaml in it" in str(info.value)
    assert "found weights.onnx" in str(info.value)
    with pytest.raises(UnknownModelError) as info:
        source.resolve(
            f"s3://{seaweed.bucket}/{prefix}/models/ghost/rdf.yaml", cache_dir=tmp_path / "cache"
        )
    assert f"no model package at s3://{seaweed.bucket}/{prefix}/models/ghost/rdf.yaml" in str(
        info.value
    )
    files = package_files()
    del files["test_output.npy"]
    key = bucket("models/incomplete", files)
    with pytest.raises(ModelError) as info:
        source.resolve("s3:incomplete", cache_dir=tmp_path / "cache")
    message = str(info.value)
    assert f"S3 GetObject of s3://{seaweed.bucket}/{key}/test_output.npy" in message
    assert "NoSuchKey" in message and "the object does not exist: upload it" in message
    with pytest.raises(ModelError) as info:
        source.resolve("s3://no-such-bucket-here/models/x/", cache_dir=tmp_path / "cache")
    assert "NoSuchBucket" in str(info.value)
    assert "bucket 'no-such-bucket-here' does not exist" in str(info.value)
    assert cached_packages(tmp_path) == []


@pytest.mark.parametrize(
    "ref",
    [
        "s3:../models",
        "s3:a/b",
        "s3:.hidden",
        "s3://bioengine-tests/models/../../etc/",
        "s3://bioengine-tests//models/",
        "s3://Bad_Bucket/models/",
        "s3://bioengine-tests/models/a%2F..%2Fb/",
    ],
)
def test_references_a_client_could_bend_are_refused_before_any_request(ref, tmp_path):
    # nothing listens on this endpoint: a request would fail with another error
    settings = S3SourceSettings(
        endpoint_url=f"http://127.0.0.1:{free_port()}", root="s3://bioengine-tests/models"
    )
    context = BackendContext(deployment="x", state_dir=tmp_path, config_dir=tmp_path)
    with pytest.raises(ModelError) as info:
        S3ModelSource(settings, context).resolve(ref, cache_dir=tmp_path / "cache")
    assert "EndpointConnectionError" not in str(info.value)


@pytest.mark.parametrize(
    "weights", ["../other/weights.onnx", "/etc/passwd", "https://example.org/weights.onnx"]
)
def test_a_description_naming_files_outside_its_folder_is_refused(
    seaweed, bucket, prefix, tmp_path, weights
):
    def point_away(data: dict) -> None:
        data["weights"]["onnx"]["source"] = weights

    key = bucket("models/escape", package_files(point_away))
    bucket("other", {"weights.onnx": (TINY / "weights.onnx").read_bytes()})
    source = make_source(seaweed, tmp_path)
    with pytest.raises(ModelError) as info:
        source.resolve(f"s3://{seaweed.bucket}/{key}/", cache_dir=tmp_path / "cache")
    assert f"s3://{seaweed.bucket}/{key}/rdf.yaml" in str(info.value)
    assert "outside its folder" in str(info.value) or "relative to its folder" in str(info.value)
    assert cached_packages(tmp_path) == []


def test_weights_without_sha256_are_refused_naming_the_setting(seaweed, bucket, tmp_path):
    def unhashed(data: dict) -> None:
        del data["weights"]["onnx"]["sha256"]

    key = bucket("models/unhashed", package_files(unhashed))
    source = make_source(seaweed, tmp_path)
    with pytest.raises(ModelError) as info:
        source.resolve(f"s3://{seaweed.bucket}/{key}/", cache_dir=tmp_path / "cache")
    assert "declares no sha256 for weights file 'weights.onnx'" in str(info.value)
    assert "[sources.s3] require_weights_sha256 = false" in str(info.value)


def test_offline_serves_the_cache_and_says_how_to_fill_it(seaweed, bucket, prefix, tmp_path):
    key = bucket("models/tiny-affine", package_files())
    ref = f"s3://{seaweed.bucket}/{key}/"
    offline = make_source(seaweed, tmp_path, offline=True)
    with pytest.raises(ModelError) as info:
        offline.resolve(ref, cache_dir=tmp_path / "cache")
    assert "[sources.s3] offline = true" in str(info.value)
    assert f"bioengine models pull {ref}" in str(info.value)
    folder = make_source(seaweed, tmp_path).resolve(ref, cache_dir=tmp_path / "cache")
    seaweed.empty(prefix)  # the bucket forgets it; the cache does not
    assert offline.resolve(ref, cache_dir=tmp_path / "cache") == folder
    # a server that does not answer: the cached copy is served, and the line says so
    lines: list[str] = []
    down = S3SourceSettings(
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        access_key_id=seaweed.access_key,
        secret_access_key=seaweed.secret_key,
        max_attempts=1,
    )
    context = BackendContext(
        deployment="x", state_dir=tmp_path / "state", config_dir=tmp_path, progress=lines.append
    )
    unreachable = S3ModelSource(down, context)
    assert unreachable.resolve(ref, cache_dir=tmp_path / "cache") == folder
    assert any("no S3 server answers" in x and "using the cached copy" in x for x in lines)


def test_listing_offers_each_folder_with_a_description_under_its_name(
    seaweed, bucket, prefix, tmp_path
):
    bucket("models/tiny-affine", package_files())
    bucket("models/tagged", package_files(lambda d: d.update(tags=["demo"], version="1.2")))
    bucket("models/no-description", {"README.md": b"nothing here"})
    bucket("models/not-a-model", {"rdf.yaml": b"type: dataset\nname: data\n"})
    bucket("models/broken", {"rdf.yaml": b"name: [unclosed\n"})
    root = f"s3://{seaweed.bucket}/{prefix}/models"
    source = make_source(seaweed, tmp_path, root)
    found = {e["id"]: e for e in source.listing(cache_dir=tmp_path / "cache")}
    assert sorted(found) == ["tagged", "tiny-affine"]
    assert found["tiny-affine"]["name"] == "Tiny Affine"
    assert "2 x + 1" in found["tiny-affine"]["description"]
    assert found["tagged"]["tags"] == ["demo"] and found["tagged"]["versions"] == ["1.2"]
    # the last listing is kept: offline mode lists it without asking the server
    offline = make_source(seaweed, tmp_path, root, offline=True)
    assert offline.listing(cache_dir=tmp_path / "cache") == list(found.values())
    with pytest.raises(ModelError) as info:
        make_source(seaweed, tmp_path).listing(cache_dir=tmp_path / "cache")
    assert "[sources.s3] root is not set" in str(info.value)


def source_site(tmp_path: Path, server: Any, root: str, **extra: str) -> Path:
    """A site config with `[sources.s3]` (credentials from named variables) and one model."""
    values = {
        "endpoint_url": server.endpoint,
        "root": root,
        "access_key_id_env": "SITE_S3_KEY",
        "secret_access_key_env": "SITE_S3_SECRET",
        **extra,
    }
    body = "".join(f'{k} = "{v}"\n' for k, v in values.items())
    path = tmp_path / "site.toml"
    path.write_text(
        f'[engine]\nname = "s3src"\nstate_dir = "state"\n\n[sources.s3]\n{body}'
        '\n[[models]]\nsource = "bundled:tiny_affine"\n'
    )
    return path


def test_config_check_contacts_the_root_and_names_the_section_and_fix(
    seaweed, bucket, prefix, tmp_path
):
    bucket("models/tiny-affine", package_files())
    creds = {"SITE_S3_KEY": seaweed.access_key, "SITE_S3_SECRET": seaweed.secret_key}
    good = source_site(tmp_path, seaweed, f"s3://{seaweed.bucket}/{prefix}/models")
    ok = run_cli("config", "check", "--config", str(good), env=creds)
    assert ok.returncode == 0, ok.stderr
    pulled = run_cli("models", "pull", "s3:tiny-affine", "--config", str(good), env=creds)
    assert pulled.returncode == 0, pulled.stderr
    assert "sha256 verified" in pulled.stdout and "s3:tiny-affine: cached at" in pulled.stdout

    wrong = run_cli("config", "check", "--config", str(good), env={**creds, "SITE_S3_SECRET": "no"})
    assert wrong.returncode == 2, wrong.stdout
    line = next(x for x in wrong.stderr.splitlines() if "[sources.s3]" in x)
    assert "SignatureDoesNotMatch" in line and "credentials refused" in line
    assert "SITE_S3_KEY and SITE_S3_SECRET named by [sources.s3] access_key_id_env" in line

    empty = source_site(tmp_path, seaweed, f"s3://{seaweed.bucket}/{prefix}/nothing-here")
    bad = run_cli("config", "check", "--config", str(empty), env=creds)
    assert bad.returncode == 2
    line = next(x for x in bad.stderr.splitlines() if "[sources.s3]" in x)
    assert f"root s3://{seaweed.bucket}/{prefix}/nothing-here/ holds nothing" in line
    assert "fix [sources.s3] root" in line

    offline = run_cli("config", "check", "--offline", "--config", str(empty), env=creds)
    assert offline.returncode == 0, offline.stderr
    unset = run_cli("config", "check", "--offline", "--config", str(empty))
    assert unset.returncode == 2
    assert "[sources.s3] key 'access_key_id_env' = 'SITE_S3_KEY'" in unset.stderr

    bad_root = source_site(tmp_path, seaweed, "s3://bioengine-tests/../x")
    refused = run_cli("config", "check", "--offline", "--config", str(bad_root), env=creds)
    assert refused.returncode == 2 and "[sources.s3] key 'root'" in refused.stderr


@pytest.mark.triton
def test_serve_answers_from_a_package_in_s3_by_reference_and_by_catalog_id(
    seaweed, bucket, prefix, tmp_path
):
    """`[[models]] source = "s3://..."` is served; `[catalog] source = "s3"` offers the other
    folders under root and loads one on its first request; both answer the test output."""
    import tritonclient.http as httpclient

    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    key = bucket("models/tiny-affine", package_files())
    bucket("models/tiny-two", package_files(lambda d: d.update(tags=["demo"])))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    site = tmp_path / "site.toml"
    site.write_text(
        f'[engine]\nname = "s3src-e2e"\nstate_dir = "{tmp_path / "state"}"\n'
        "health_interval = 0.5\nstop_grace = 5\n\n"
        '[executor]\nkind = "local"\nmode = "process"\n\n'
        f'[gateways.http]\nkind = "http"\nport = {port}\n\n'
        f'[sources.s3]\nendpoint_url = "{seaweed.endpoint}"\n'
        f'root = "s3://{seaweed.bucket}/{prefix}/models"\n'
        'access_key_id_env = "SITE_S3_KEY"\nsecret_access_key_env = "SITE_S3_SECRET"\n\n'
        '[catalog]\nenabled = true\nsource = "s3"\nallow = ["tiny-*"]\nload_timeout = 120\n\n'
        f'[[models]]\nsource = "s3://{seaweed.bucket}/{key}/"\n'
    )
    env = {"SITE_S3_KEY": seaweed.access_key, "SITE_S3_SECRET": seaweed.secret_key}
    checked = run_cli("config", "check", "--config", str(site), env=env)
    assert checked.returncode == 0, checked.stderr
    x = np.load(TINY / "test_input.npy").astype(np.float32)
    expected = np.load(TINY / "test_output.npy")
    serve = Serve(site, env=env)
    try:
        serve.wait_serving(timeout=180)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=180)
        try:
            for model in ("tiny-affine", "tiny-two"):
                inp = httpclient.InferInput("x", list(x.shape), "FP32")
                inp.set_data_from_numpy(x, binary_data=True)
                y = client.infer(model, [inp]).as_numpy("y")
                np.testing.assert_allclose(y, expected, atol=1e-5, err_msg=model)
        finally:
            client.close()
        assert "model tiny-two: loading on demand" in serve.output
        assert "sha256 verified" in serve.output
        catalog = get_status(url)["catalog"]
        assert catalog["offered"] == 2, catalog
    finally:
        serve.stop()
        (tmp_path / "serve.log").write_text(serve.output)
