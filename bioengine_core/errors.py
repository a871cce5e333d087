"""The one error tree of BioEngine: every error a user can see derives from BioEngineError."""

from __future__ import annotations


class BioEngineError(Exception):
    """Base of every error that BioEngine reports to a user."""


class ConfigError(BioEngineError):
    """A site configuration is invalid; the message names file, section, key and value."""

    def __init__(self, message: str, *, problems: list[str] | None = None):
        super().__init__(message)
        self.problems = problems or [message]


class PluginError(BioEngineError):
    """A plugin could not be loaded, is duplicated, or is missing for a configured kind."""


class ExecutorError(BioEngineError):
    """An executor failed to start, stop or inspect a replica."""


class CommandError(ExecutorError):
    """An external command failed; carries the command line, exit code and stderr."""

    def __init__(self, cmd: list[str], exit_code: int | None, stdout: str = "", stderr: str = ""):
        self.cmd = list(cmd)
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr
        shown = " ".join(self.cmd)
        super().__init__(
            f"command failed (exit code {exit_code}): {shown}\n{stderr.strip() or stdout.strip()}"
        )


class StorageError(BioEngineError):
    """A model repository operation (put/get/list/delete) failed."""


class ModelError(BioEngineError):
    """A model reference cannot be resolved or its package is invalid."""


class UnknownModelError(ModelError):
    """A model source has no model of that id (the zoo answered 'not found')."""


class InferenceError(BioEngineError):
    """An inference request failed; `status` is the HTTP status a gateway should answer."""

    def __init__(self, message: str, *, status: int = 500):
        super().__init__(message)
        self.status = status


class ModelNotFoundError(InferenceError):
    """The requested model is not served here."""

    def __init__(
        self, model_id: str, available: list[str] | None = None, *, offered: str | None = None
    ):
        avail = ", ".join(sorted(available or [])[:50]) or "none"
        where = f"; it is not offered by {offered}" if offered else ""
        super().__init__(f"unknown model '{model_id}' (served models: {avail}){where}", status=404)
        self.model_id = model_id


class InvalidInputError(InferenceError):
    """The request's tensors do not match the model's inputs (name, shape or dtype)."""

    def __init__(self, message: str):
        super().__init__(message, status=400)


class NoReplicaError(InferenceError):
    """No ready replica could answer the request in time."""

    def __init__(self, message: str, *, retry_after: float = 5.0):
        super().__init__(message, status=503)
        self.retry_after = retry_after


class OverloadedError(InferenceError):
    """A model's queue is full: the caller should retry after `retry_after` seconds (429)."""

    def __init__(self, message: str, *, retry_after: float = 1.0):
        super().__init__(message, status=429)
        self.retry_after = retry_after
