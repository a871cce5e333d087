"""Settings of the S3 plugin: `[storage] kind = "s3"` (the model repository in a bucket) and
`[sources.s3]` (model packages read from a bucket), sharing how an S3 server is reached."""

from __future__ import annotations

import os
import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator

from bioengine_core.contracts import BackendSettings

# What Triton accepts in an `s3://` repository path (its own parser): lower-case bucket names,
# and path segments of letters, digits, `.`, `-` and `_`.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
_SEGMENT = re.compile(r"^[0-9A-Za-z._\-]+$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_endpoint(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip().rstrip("/")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL such as http://127.0.0.1:9000")
    if parts.path or parts.query or parts.fragment:
        raise ValueError("must be scheme://host[:port] without a path")
    parts.port  # noqa: B018  (raises ValueError for a malformed port)
    return value


def check_bucket(value: str) -> str:
    """A bucket name S3 and Triton accept; ValueError saying the rule otherwise."""
    if not _BUCKET.fullmatch(value) or ".." in value:
        raise ValueError(
            "bucket names are 3-63 lower-case letters, digits, '.' and '-' "
            "(Triton cannot read other names)"
        )
    return value


def parse_s3_url(value: str) -> tuple[str, str]:
    """`s3://BUCKET/PRE/FIX/` → ("BUCKET", "PRE/FIX"); ValueError for anything that is not a
    bucket and key segments of letters, digits, '.', '-' and '_' (no '..', no empty segment)."""
    if not value.startswith("s3://"):
        raise ValueError(f"{value[:200]!r} is not an s3://BUCKET/PREFIX URL")
    bucket, _, prefix = value[len("s3://") :].partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValueError(
            f"bucket {bucket[:80]!r} of {value[:200]!r}: bucket names are 3-63 lower-case "
            "letters, digits, '.' and '-'"
        )
    prefix = prefix.rstrip("/")
    for segment in prefix.split("/") if prefix else []:
        if not _SEGMENT.fullmatch(segment) or segment in (".", ".."):
            raise ValueError(
                f"key segment {segment[:80]!r} of {value[:200]!r}: use letters, digits, '.', '-' and '_' "
                "(no '..', no empty segments)"
            )
    return bucket, prefix


class S3ConnectionSettings(BackendSettings):
    """How BioEngine reaches an S3 server: endpoint, region, credentials, addressing, retries.

    Shared by `[storage] kind = "s3"` and `[sources.s3]`, so both read credentials the same way.
    """

    endpoint_url: str | None = Field(
        None,
        description="S3 endpoint for S3-compatible servers (MinIO, SeaweedFS, Ceph), e.g. "
        "`http://s3.example.org:9000`. Unset: Amazon S3 in `region`.",
    )
    region: str = Field("us-east-1", description="S3 region (AWS_DEFAULT_REGION of replicas).")
    access_key_id: SecretStr | None = Field(
        None,
        description="Access key id. Prefer `access_key_id_env`, or the section's environment "
        "variable (BIOENGINE_STORAGE__ACCESS_KEY_ID, BIOENGINE_SOURCES__S3__ACCESS_KEY_ID), "
        "over writing it into the file.",
    )
    secret_access_key: SecretStr | None = Field(
        None, description="Secret access key (never logged or shown by `config check`)."
    )
    session_token: SecretStr | None = Field(
        None, description="Session token of temporary credentials (optional)."
    )
    access_key_id_env: str | None = Field(
        None,
        description="Name of an environment variable holding the access key id, read at start. "
        "Without any credential setting, boto3's default chain is used (AWS_* variables, "
        "~/.aws, instance roles) and replicas resolve their own credentials the same way.",
    )
    secret_access_key_env: str | None = Field(
        None, description="Name of an environment variable holding the secret access key."
    )
    addressing_style: Literal["auto", "path", "virtual"] = Field(
        "auto",
        description="`path` (http://host/bucket/key) or `virtual` (http://bucket.host/key). "
        "`auto`: path for a custom `endpoint_url`, boto3's choice for Amazon S3.",
    )
    verify_tls: bool = Field(True, description="Verify the endpoint's TLS certificate.")
    max_concurrency: int = Field(
        4, ge=1, le=64, description="Parallel uploads/downloads (files and parts)."
    )
    max_attempts: int = Field(
        5, ge=1, le=20, description="Attempts per S3 request (botocore's retry, with backoff)."
    )

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint(cls, value: str | None) -> str | None:
        return _check_endpoint(value)

    @field_validator("access_key_id_env", "secret_access_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME.fullmatch(value):
            raise ValueError("must be the name of an environment variable, e.g. S3_ACCESS_KEY")
        return value

    @model_validator(mode="after")
    def _credentials_pairs(self) -> S3ConnectionSettings:
        key = self.access_key_id is not None or self.access_key_id_env is not None
        secret = self.secret_access_key is not None or self.secret_access_key_env is not None
        if key != secret:
            raise ValueError(
                "give both the access key id and the secret access key (directly or by "
                "environment variable name), or neither (boto3's default credential chain)"
            )
        if self.access_key_id is not None and self.access_key_id_env is not None:
            raise ValueError("give access_key_id or access_key_id_env, not both")
        if self.secret_access_key is not None and self.secret_access_key_env is not None:
            raise ValueError("give secret_access_key or secret_access_key_env, not both")
        return self

    # ------------------------------------------------------------------ derived values

    def explicit_credentials(self) -> dict[str, str] | None:
        """Configured credentials as AWS_* variables; None when boto3's default chain applies.

        Raises KeyError naming the variable when an `*_env` setting names an unset variable.
        """
        if self.access_key_id is None and self.access_key_id_env is None:
            return None

        def read(secret: SecretStr | None, env: str | None) -> str:
            if secret is not None:
                return secret.get_secret_value()
            assert env is not None
            if not os.environ.get(env):
                raise KeyError(env)
            return os.environ[env]

        creds = {
            "AWS_ACCESS_KEY_ID": read(self.access_key_id, self.access_key_id_env),
            "AWS_SECRET_ACCESS_KEY": read(self.secret_access_key, self.secret_access_key_env),
        }
        if self.session_token is not None:
            creds["AWS_SESSION_TOKEN"] = self.session_token.get_secret_value()
        return creds

    def path_style(self) -> bool:
        """Whether requests address the bucket in the path (the norm for on-site S3 servers)."""
        if self.addressing_style == "auto":
            return self.endpoint_url is not None
        return self.addressing_style == "path"


class S3StorageSettings(S3ConnectionSettings):
    """`[storage] kind = "s3"`: models live under `s3://BUCKET/PREFIX/NAME/`."""

    kind: Literal["s3"] = "s3"
    bucket: str = Field(
        description="Bucket name (lower-case letters, digits, `.` and `-`, as Triton requires)."
    )
    prefix: str = Field(
        "",
        description="Key prefix of the repository inside the bucket, e.g. `bioengine/site-a` "
        "(segments of letters, digits, `.`, `-`, `_`). Empty: the bucket root.",
    )
    replica_endpoint_url: str | None = Field(
        None,
        description="The endpoint as replicas reach it, when it differs from `endpoint_url` "
        "(the engine uses 127.0.0.1, compute nodes a cluster host name).",
    )
    create_bucket: bool = Field(
        False, description="Create the bucket when it does not exist (else: an error)."
    )
    mode: Literal["s3", "sync"] = Field(
        "s3",
        description="`s3`: replicas read `s3://...` directly (Triton's S3 support, credentials "
        "passed in their environment). `sync`: the engine mirrors the bucket into `sync_dir` on "
        "this host and replicas read that directory (for Triton builds or nodes without S3 "
        "access; the directory must be visible to the replicas).",
    )
    sync_dir: str | None = Field(
        None,
        description="Directory of the local mirror in mode `sync` (default: "
        "STATE_DIR/s3-mirror). Relative paths are relative to the config file.",
    )
    multipart_threshold_mb: int = Field(
        64, ge=5, description="Files at least this large upload in parts, in parallel."
    )
    read_timeout: float = Field(
        60.0,
        gt=0,
        description="Seconds a read retries when a model's content is missing or damaged "
        "(it was deleted or changed by hand); then it fails with a clear error.",
    )

    @field_validator("bucket")
    @classmethod
    def _bucket_name(cls, value: str) -> str:
        return check_bucket(value)

    @field_validator("prefix")
    @classmethod
    def _prefix_path(cls, value: str) -> str:
        value = value.strip("/")
        for segment in value.split("/") if value else []:
            if not _SEGMENT.fullmatch(segment) or segment in (".", "..") or segment == ".bioengine":
                raise ValueError(
                    f"prefix segment {segment!r}: use letters, digits, '.', '-' and '_' "
                    "(Triton cannot read other paths)"
                )
        return value

    @field_validator("replica_endpoint_url")
    @classmethod
    def _replica_endpoint(cls, value: str | None) -> str | None:
        return _check_endpoint(value)

    @model_validator(mode="after")
    def _triton_can_read(self) -> S3StorageSettings:
        if self.mode == "s3":
            self.triton_uri()  # refuses endpoints Triton cannot name
        return self

    def triton_uri(self) -> str:
        """The repository as Triton's `--model-repository` names it.

        Amazon S3: `s3://bucket/prefix`. Another endpoint: `s3://http://host:port/bucket/prefix`
        (Triton's parser needs the port, so the scheme's default is filled in).
        """
        tail = "/".join(p for p in (self.bucket, self.prefix) if p)
        endpoint = self.replica_endpoint_url or self.endpoint_url
        if endpoint is None:
            return f"s3://{tail}"
        parts = urlsplit(endpoint)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname or ""
        if ":" in host:  # an IPv6 literal: Triton's parser has no brackets
            raise ValueError("Triton cannot reach an S3 endpoint given by an IPv6 address")
        return f"s3://{parts.scheme}://{host}:{port}/{tail}"


class S3SourceSettings(S3ConnectionSettings):
    """`[sources.s3]`: bioimage.io packages kept in a bucket, one folder per package.

    `[[models]] source = "s3://BUCKET/PREFIX/"` names one package folder; with `root` set,
    `s3:NAME` (catalog mode's ids) names the folder `root/NAME/`.
    """

    kind: str = "s3"
    root: str = Field(
        "",
        description="`s3://BUCKET/PREFIX` whose sub-folders are packages: catalog mode "
        '(`[catalog] source = "s3"`) offers each sub-folder holding a description, under the '
        "sub-folder's name. Empty: only full `s3://` references resolve.",
    )
    cache_dir: str = Field("", description="Cache folder ('' for <engine.state_dir>/sources/s3).")
    offline: bool = Field(
        False, description="Serve only what is cached (fill it with `bioengine models pull`)."
    )
    require_weights_sha256: bool = Field(
        True, description="Reject packages whose weights declare no sha256."
    )
    max_listed: int = Field(
        1000,
        ge=1,
        le=100_000,
        description="At most this many sub-folders of `root` are read for catalog listings.",
    )

    @field_validator("root")
    @classmethod
    def _root(cls, value: str) -> str:
        value = value.strip()
        if value:
            bucket, prefix = parse_s3_url(value)
            value = f"s3://{bucket}/{prefix}".rstrip("/")
        return value

    def root_location(self) -> tuple[str, str] | None:
        """(bucket, prefix) of `root`, or None when it is not set."""
        return parse_s3_url(self.root) if self.root else None
