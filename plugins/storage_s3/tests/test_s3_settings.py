"""`[storage] kind = "s3"` in a site config: validation, secrets, Triton's URI, the factory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bioengine_storage_s3 import S3Storage, S3StorageSettings
from bioengine_storage_s3.plugin import make_storage
from core_helpers import run_cli
from pydantic import ValidationError

from bioengine_core.contracts import BackendContext
from bioengine_core.errors import StorageError

SECRET = "very-secret-value-4711"


def site(tmp_path: Path, storage: str) -> Path:
    """A site config with the given [storage] body."""
    path = tmp_path / "site.toml"
    path.write_text(f'[engine]\nname = "s3t"\nstate_dir = "state"\n\n[storage]\n{storage}')
    return path


GOOD = f"""kind = "s3"
endpoint_url = "http://127.0.0.1:23333"
bucket = "models"
prefix = "site-a/v1"
access_key_id = "bioengine-ci"
secret_access_key = "{SECRET}"
"""


def test_config_check_accepts_and_masks_the_secret(tmp_path):
    """A valid section passes `config check --show`, and the secret is never printed."""
    result = run_cli(
        "config", "check", "--offline", "--show", "--config", str(site(tmp_path, GOOD))
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "storage 's3'" in result.stdout
    assert SECRET not in result.stdout + result.stderr
    assert "bioengine-ci" not in result.stdout  # the key id is a SecretStr too


@pytest.mark.parametrize(
    "good, bad, key",
    [
        ('bucket = "models"', 'bucket = "My_Models"', "bucket"),
        ('prefix = "site-a/v1"', 'prefix = "site a/v1"', "prefix"),
        (
            'endpoint_url = "http://127.0.0.1:23333"',
            'endpoint_url = "127.0.0.1:23333/path"',
            "endpoint_url",
        ),
        ("secret_access_key =", "secret_access_ky =", "secret_access_ky"),
    ],
)
def test_config_check_names_the_bad_key(tmp_path, good, bad, key):
    """Bad values exit 2 with a message naming the file, [storage] and the key."""
    path = site(tmp_path, GOOD.replace(good, bad))
    result = run_cli("config", "check", "--offline", "--config", str(path))
    out = (result.stdout + result.stderr).replace("\n", "")
    assert result.returncode == 2, out
    assert str(path) in out and "[storage]" in out and f"'{key}'" in out
    assert SECRET not in out


def test_half_a_credential_pair_is_refused():
    """A key id without its secret (or the reverse) is a config error, not a runtime surprise."""
    with pytest.raises(ValidationError, match="both"):
        S3StorageSettings(bucket="models", access_key_id="id-only")
    with pytest.raises(ValidationError, match="not both"):
        S3StorageSettings(
            bucket="models",
            access_key_id="a",
            access_key_id_env="A",
            secret_access_key="b",
        )


def test_endpoints_triton_cannot_name_are_refused():
    """Triton's s3:// parser has no IPv6 literals: refused at config time in mode s3."""
    with pytest.raises(ValidationError, match="IPv6"):
        S3StorageSettings(bucket="models", endpoint_url="http://[::1]:9000")
    S3StorageSettings(bucket="models", endpoint_url="http://[::1]:9000", mode="sync")


def test_secret_from_the_environment_override(tmp_path):
    """BIOENGINE_STORAGE__SECRET_ACCESS_KEY supplies the secret without writing it in the file."""
    text = GOOD.replace(f'secret_access_key = "{SECRET}"\n', "")
    result = run_cli(
        "config",
        "check",
        "--offline",
        "--show",
        "--config",
        str(site(tmp_path, text)),
        env={"BIOENGINE_STORAGE__SECRET_ACCESS_KEY": SECRET},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert SECRET not in result.stdout


def test_schema_lists_the_s3_settings():
    """`bioengine config schema` documents the s3 storage's keys."""
    result = run_cli("config", "schema")
    assert result.returncode == 0, result.stderr
    text = json.dumps(json.loads(result.stdout))
    for key in ("replica_endpoint_url", "create_bucket", "secret_access_key_env", "sync_dir"):
        assert key in text


@pytest.mark.parametrize(
    "settings, uri",
    [
        ({}, "s3://models/site-a"),
        ({"endpoint_url": "http://127.0.0.1:23333"}, "s3://http://127.0.0.1:23333/models/site-a"),
        (
            {"endpoint_url": "https://s3.example.org"},
            "s3://https://s3.example.org:443/models/site-a",
        ),
        ({"endpoint_url": "http://minio"}, "s3://http://minio:80/models/site-a"),
        (
            {"endpoint_url": "http://127.0.0.1:9000", "replica_endpoint_url": "http://s3.lan:9000"},
            "s3://http://s3.lan:9000/models/site-a",
        ),
        ({"prefix": ""}, "s3://models"),
    ],
)
def test_triton_uri(settings, uri):
    """location().uri is Triton's `s3://` form, with the scheme and a port for custom endpoints."""
    values = {"bucket": "models", "prefix": "/site-a/", **settings}
    storage = S3Storage(S3StorageSettings(**values))
    try:
        assert storage.location().uri == uri
    finally:
        storage.close()


def test_location_env_carries_configured_credentials_only():
    """Replicas get the configured keys; without any, only the region (they use their own chain)."""
    explicit = S3Storage(
        S3StorageSettings(
            bucket="models", region="eu-west-1", access_key_id="AK", secret_access_key=SECRET
        )
    )
    env = explicit.location().env
    assert env["AWS_ACCESS_KEY_ID"] == "AK" and env["AWS_SECRET_ACCESS_KEY"] == SECRET
    assert env["AWS_DEFAULT_REGION"] == "eu-west-1"
    assert (
        SECRET not in repr(explicit.settings) and SECRET not in explicit.settings.model_dump_json()
    )
    default_chain = S3Storage(S3StorageSettings(bucket="models"))
    assert set(default_chain.location().env) == {"AWS_DEFAULT_REGION", "AWS_REGION"}


def test_credentials_from_named_variables(tmp_path, monkeypatch):
    """`*_env` settings read the named variables; an unset one is reported by name."""
    context = BackendContext(deployment="t", state_dir=tmp_path, config_dir=tmp_path)
    settings = S3StorageSettings(
        bucket="models", access_key_id_env="SITE_S3_KEY", secret_access_key_env="SITE_S3_SECRET"
    )
    monkeypatch.delenv("SITE_S3_KEY", raising=False)
    with pytest.raises(StorageError, match="SITE_S3_KEY"):
        make_storage(settings=settings, context=context)
    monkeypatch.setenv("SITE_S3_KEY", "AK")
    monkeypatch.setenv("SITE_S3_SECRET", SECRET)
    storage = make_storage(settings=settings, context=context)
    assert storage.location().env["AWS_SECRET_ACCESS_KEY"] == SECRET


def test_sync_mode_mirrors_into_the_state_dir_by_default(tmp_path):
    """Mode sync without sync_dir mirrors into STATE_DIR/s3-mirror; a relative one is config-relative."""
    context = BackendContext(deployment="t", state_dir=tmp_path / "state", config_dir=tmp_path)
    storage = make_storage(
        settings=S3StorageSettings(bucket="models", mode="sync"), context=context
    )
    assert storage.sync_dir == tmp_path / "state" / "s3-mirror"
    relative = S3StorageSettings(bucket="models", mode="sync", sync_dir="mirror")
    assert make_storage(settings=relative, context=context).sync_dir == tmp_path / "mirror"


def test_the_example_config_is_valid():
    """plugins/storage_s3/examples/s3.toml passes `config check` (docs/s3.md points to it)."""
    example = Path(__file__).resolve().parents[1] / "examples" / "s3.toml"
    env = {"SITE_S3_ACCESS_KEY": "example-key-id", "SITE_S3_SECRET_KEY": "example-secret"}
    result = run_cli("config", "check", "--offline", "--config", str(example), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "storage 's3'" in result.stdout and "1 model(s)" in result.stdout
    # without them, config check says which variable is missing (serve would need it)
    blank = run_cli("config", "check", "--config", str(example), env={k: "" for k in env})
    assert blank.returncode == 2 and "SITE_S3_SECRET_KEY is not set" in blank.stderr
