"""What the storage and the model source share about talking to S3: the boto3 client for a
settings section, and turning what boto3 raises into one line for the operator (the operation,
the object, S3's error code and message, then the cause and the setting that fixes it).

Both name their own section in those lines (`[storage]`, `[sources.s3]`); never the
credentials' values.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import boto3
import boto3.exceptions
import botocore.exceptions
from botocore.config import Config
from botocore.exceptions import ConnectTimeoutError

from bioengine_core.errors import BioEngineError, ModelError, StorageError, UnknownModelError

from .settings import S3ConnectionSettings

ERRORS = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    boto3.exceptions.Boto3Error,
)
"""What boto3 raises: turned into one-line errors with cause and fix."""

CONNECTION_CODES = frozenset({"EndpointConnectionError", "ReadTimeout"})
"""Error codes of requests that got no answer from the server (an outage, not a refusal)."""


class S3StorageError(StorageError):
    """An S3 request failed; `code` is S3's error code (`NoSuchBucket`, `AccessDenied`, ...)."""

    def __init__(self, message: str, *, code: str = "", operation: str = "", key: str = ""):
        super().__init__(message)
        self.code = code
        self.operation = operation
        self.key = key


class S3SourceError(ModelError):
    """Reading a model package from S3 failed; `code` as in S3StorageError."""

    def __init__(self, message: str, *, code: str = "", operation: str = "", key: str = ""):
        super().__init__(message)
        self.code = code
        self.operation = operation
        self.key = key


class S3PackageMissing(S3SourceError, UnknownModelError):
    """No package where a reference points (catalog mode answers 404 for it)."""


def s3_client(settings: S3ConnectionSettings, creds: dict[str, str], *, quick: bool = False) -> Any:
    """A boto3 S3 client for the settings' endpoint, with `creds` (AWS_* names) if given;
    `quick`: short timeouts and a single attempt (for preflight checks)."""
    extra: dict[str, Any] = {"connect_timeout": 3, "read_timeout": 5} if quick else {}
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.endpoint_url,
        region_name=settings.region,
        aws_access_key_id=creds.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=creds.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=creds.get("AWS_SESSION_TOKEN"),
        verify=settings.verify_tls,
        config=Config(
            s3={"addressing_style": "path" if settings.path_style() else "auto"},
            # total_max_attempts counts the first try (botocore's max_attempts counts retries only)
            retries={
                "total_max_attempts": 1 if quick else settings.max_attempts,
                "mode": "standard",
            },
            **extra,
            max_pool_connections=max(10, 2 * settings.max_concurrency),
            # Only checksums the server asked for: on-site S3 servers vary in support.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


class S3Diagnosis:
    """Turns boto3's exceptions into one-line errors naming the section's settings.

    Users set `settings`, `bucket`, `prefix` and `_client`; the class attributes say which
    section the lines name, which rights the user needs and which error type is raised.
    """

    section: ClassVar[str] = "[storage]"
    rights: ClassVar[str] = "list, read and write"
    error_type: ClassVar[type[BioEngineError]] = S3StorageError
    settings: S3ConnectionSettings
    bucket: str
    prefix: str
    _client: Any

    def _url(self, key: str = "") -> str:
        return f"s3://{self.bucket}/{key}"

    def _credential_settings(self) -> str:
        """How the credentials were given, as the operator wrote it (never the values)."""
        st = self.settings
        if st.access_key_id_env or st.secret_access_key_env:
            return (
                f"the variables {st.access_key_id_env or '(access_key_id)'} and "
                f"{st.secret_access_key_env or '(secret_access_key)'} named by {self.section} "
                "access_key_id_env / secret_access_key_env"
            )
        if st.access_key_id is not None:
            return f"{self.section} access_key_id / secret_access_key"
        return "the AWS credentials of the environment (AWS_ACCESS_KEY_ID, ~/.aws, a role)"

    def _endpoint(self) -> str:
        """The S3 server as the operator configured it."""
        return self.settings.endpoint_url or f"Amazon S3 (region {self.settings.region})"

    def _missing_bucket(self) -> str:
        """Cause and fix of a bucket that does not exist."""
        return f"bucket {self.bucket!r} does not exist at {self._endpoint()}"

    def _missing_object(self) -> str:
        """Cause and fix of an object that does not exist."""
        return "the object does not exist"

    def _not_s3(self) -> str:
        """Cause and fix of an endpoint whose 404 answers carry no S3 error code."""
        return (
            f"the server at {self._endpoint()} answers HTTP 404 without an S3 error code: it "
            f"is not an S3 API; check {self.section} endpoint_url (the S3 port, e.g. MinIO's "
            "API port rather than its console, SeaweedFS's -s3.port rather than its master or "
            "filer)"
        )

    def _hint(self, code: str, operation: str) -> str:
        """Cause and fix of an S3 error code an operator can cause ("" when none is known)."""
        if code == "404" and not operation.startswith("Head"):
            # S3 answers every refused GET/PUT/LIST with an XML error code (NoSuchBucket,
            # NoSuchKey); a bare 404 comes from a web page, a console or another service.
            return self._not_s3()
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return f"credentials refused: check {self._credential_settings()}"
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
            return (
                f"credentials refused or not allowed here: check {self._credential_settings()}, "
                f"or the bucket policy (this user needs {self.rights} on "
                f"s3://{self.bucket}/{self.prefix})"
            )
        if code == "NoSuchBucket" or (code in ("404", "NotFound") and operation == "HeadBucket"):
            return self._missing_bucket()
        if code in ("NoSuchKey", "404", "NotFound"):
            return self._missing_object()
        if code in (
            "PermanentRedirect",
            "AuthorizationHeaderMalformed",
            "IllegalLocationConstraintException",
            "301",
        ) or (code == "400" and operation == "HeadBucket"):
            return (
                f"the bucket is in another region: fix {self.section} region "
                f"({self.settings.region!r})"
            )
        if code in ("InternalError", "ServiceUnavailable", "SlowDown") or code[:1] == "5":
            return (
                f"the S3 server at {self._endpoint()} failed on its side: check its health "
                "and log, then retry"
            )
        return ""

    @staticmethod
    def _status(exc: botocore.exceptions.ClientError) -> int:
        """The HTTP status of a refused request (0 when unknown)."""
        return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)

    def _error(self, exc: BaseException, operation: str, key: str = "") -> Any:
        """One line for the operator: what failed (S3's error code, the operation, the object),
        the likely cause and the setting that fixes it; never the credentials' values."""
        where = self._url(key)
        if self.settings.endpoint_url:
            where += f" at {self.settings.endpoint_url}"
        # boto3's transfer manager wraps the botocore error that actually happened
        if isinstance(exc, boto3.exceptions.Boto3Error):
            inner = exc.__cause__ or exc.__context__
            if isinstance(
                inner, botocore.exceptions.BotoCoreError | botocore.exceptions.ClientError
            ):
                exc = inner
        code, detail, hint = type(exc).__name__, str(exc), ""
        if isinstance(exc, botocore.exceptions.ClientError):
            err = exc.response.get("Error", {})
            code = str(err.get("Code", "")) or str(
                exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
            )
            detail = err.get("Message", "") or str(exc)
            hint = self._hint(code, operation)
        elif isinstance(exc, botocore.exceptions.NoCredentialsError):
            code, detail = "NoCredentials", "no credentials found"
            hint = (
                f"set {self.section} access_key_id_env / secret_access_key_env (or "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in the environment)"
            )
        elif isinstance(exc, botocore.exceptions.SSLError):
            code = "SSLError"
            hint = (
                f"TLS with {self._endpoint()} failed: check the scheme (http/https) of "
                f"{self.section} endpoint_url, or the certificate ({self.section} verify_tls)"
            )
        elif isinstance(
            exc,
            botocore.exceptions.EndpointConnectionError
            | ConnectTimeoutError
            | botocore.exceptions.ProxyConnectionError
            | botocore.exceptions.ConnectionClosedError,
        ):
            code = "EndpointConnectionError"
            hint = (
                f"no S3 server answers at {self._endpoint()}: check {self.section} endpoint_url "
                "and the network (is the server running and reachable from here?)"
            )
        elif isinstance(exc, botocore.exceptions.ReadTimeoutError):
            code = "ReadTimeout"
            hint = (
                f"the S3 server at {self._endpoint()} accepted the connection but did not "
                f"answer in time: check its health, or {self.section} endpoint_url"
            )
        message = f"S3 {operation} of {where} failed: {code}: {detail}"
        if hint:
            message += f" — {hint}"
        return self.error_type(  # type: ignore[call-arg]
            " ".join(message.split()), code=code, operation=operation, key=key
        )

    @staticmethod
    def _code(exc: Exception) -> str:
        if isinstance(exc, botocore.exceptions.ClientError):
            return str(exc.response.get("Error", {}).get("Code", ""))
        return ""

    def _call(self, operation: str, key: str, fn: Callable[..., Any], **kwargs: Any) -> Any:
        try:
            return fn(**kwargs)
        except ERRORS as exc:
            raise self._error(exc, operation, key) from exc


__all__ = [
    "CONNECTION_CODES",
    "ERRORS",
    "S3Diagnosis",
    "S3PackageMissing",
    "S3SourceError",
    "S3StorageError",
    "s3_client",
]
