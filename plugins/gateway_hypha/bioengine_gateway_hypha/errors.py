"""What a caller sees when a request fails: one line, no traceback, no server file paths.

User errors (bad model id, wrong inputs, refused permission, bad arguments, timeouts) keep
their message; anything else is logged here with its traceback under a short reference and
the caller gets "internal error (ref ...)". hypha-rpc puts the full traceback of an exception
raised by a service function into the caller's error, so `install_error_guard` makes one
connection send guarded functions' errors as plain messages instead.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import re
import secrets
import sys
from collections.abc import Callable
from typing import Any

from bioengine_core.errors import BioEngineError, ExecutorError, InferenceError, StorageError

log = logging.getLogger("bioengine.gateway.hypha")

MAX_MESSAGE = 2000
"""Longest message text a caller gets (characters); longer ones are cut."""

GUARDED = "__bioengine_guarded__"
"""Attribute that marks a function wrapped by `guard`."""

_TRACE_START = re.compile(r"Traceback \(most recent call last\)|\n\s*At:\s*\n|\n\s*File \"")


class PublicError(Exception):
    """A failure as the caller may see it: `kind`, one-line `text`, HTTP `status`."""

    def __init__(self, kind: str, text: str, *, status: int = 500) -> None:
        self.kind = kind
        self.text = text
        self.status = status
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """ "Kind: text", as the Hypha services report it."""
        return f"{self.kind}: {self.text}"


class RequestTooLargeError(InferenceError):
    """A request's inputs exceed the gateway's size limit (HTTP 413)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=413)


def one_line(text: str) -> str:
    """`text` without any traceback part, on one line, at most MAX_MESSAGE characters."""
    match = _TRACE_START.search(text)
    if match:
        text = text[: match.start()]
    text = " ".join(part.strip() for part in text.splitlines() if part.strip())
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 3] + "..."
    return text or "(no message)"


def public_error(exc: BaseException, *, where: str = "request") -> PublicError:
    """Classify `exc`: user errors keep their message, anything else gets a logged reference."""
    if isinstance(exc, PublicError):
        return exc
    kind = type(exc).__name__
    if isinstance(exc, TimeoutError) or (isinstance(exc, InferenceError) and exc.status == 504):
        text = one_line(str(exc)) if str(exc) else ""
        if "timed out" not in text:
            text = f"the request timed out{': ' + text if text else ''}"
        return PublicError("TimeoutError", text, status=504)
    if isinstance(exc, BioEngineError) and not isinstance(exc, (ExecutorError, StorageError)):
        status = exc.status if isinstance(exc, InferenceError) else 400
        return PublicError(kind, one_line(str(exc)), status=status)
    if isinstance(exc, PermissionError):
        return PublicError(kind, one_line(str(exc)), status=403)
    if isinstance(exc, (ValueError, TypeError)):
        return PublicError(kind, one_line(str(exc)), status=400)
    ref = secrets.token_hex(4)
    log.error("internal error (ref %s) in %s", ref, where, exc_info=exc)
    return PublicError(
        "InternalError", f"internal error (ref {ref}); the operator's log has the details"
    )


def guard(fn: Callable[..., Any], *, where: str | None = None) -> Callable[..., Any]:
    """`fn` as a coroutine function that raises only PublicError (for Hypha registration)."""
    name = where or getattr(fn, "__name__", "call")

    @functools.wraps(fn)
    async def guarded(*args: Any, **kwargs: Any) -> Any:
        try:
            result = fn(*args, **kwargs)  # bad arguments raise TypeError here: caught too
            if inspect.isawaitable(result):
                result = await result
            return result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            public = public_error(exc, where=name)
            if public.kind != "InternalError":
                log.info("%s failed: %s", name, public.message)
            raise public from None

    setattr(guarded, GUARDED, True)
    return guarded


def _encode_public(error: PublicError) -> dict[str, Any]:
    """hypha-rpc's own error encoding with the message only (no `_rtrace`)."""
    return {"_rtype": "error", "_rvalue": error.message}


def _clean_reject(reject: Callable[..., Any], method_name: str | None) -> Callable[..., Any]:
    """Wrap hypha-rpc's reject callback so that only a PublicError ever reaches the caller.

    hypha-rpc rejects a failed coroutine with a new Exception holding the formatted traceback,
    from inside its `except` block: the original PublicError is the exception being handled.
    """

    def reject_cleanly(error: Any) -> Any:
        if not isinstance(error, PublicError):
            current = sys.exc_info()[1]
            if isinstance(current, PublicError):
                error = current
            else:
                error = public_error(
                    error if isinstance(error, BaseException) else RuntimeError(str(error)),
                    where=method_name or "hypha call",
                )
        return reject(error)

    return reject_cleanly


def install_error_guard(server: Any) -> bool:
    """Make one hypha-rpc connection answer failures of guarded functions without traceback.

    Registers an encoder for PublicError (message only) and wraps the connection's method
    dispatch so that guarded functions reject with their PublicError. False (and a warning)
    if hypha-rpc's internals are not as expected: errors then carry hypha-rpc's traceback.
    """
    rpc = getattr(server, "rpc", None)
    original = getattr(rpc, "_call_method", None)
    if rpc is None or original is None:
        log.warning("hypha-rpc internals changed: callers may see server tracebacks")
        return False
    rpc.register_codec({"name": "bioengine-error", "type": PublicError, "encoder": _encode_public})
    if getattr(original, GUARDED, False):
        return True

    def call_method(method, args, kwargs, resolve=None, reject=None, *rest, **options):  # type: ignore[no-untyped-def]
        if reject is not None and getattr(method, GUARDED, False):
            reject = _clean_reject(reject, options.get("method_name"))
        return original(method, args, kwargs, resolve, reject, *rest, **options)

    setattr(call_method, GUARDED, True)
    rpc._call_method = call_method
    return True
