"""Log hygiene: no log line carries a request body, control characters or unbounded text.

A malformed request makes aiohttp log the exception with the bytes it could not parse; a
hostile client could fill or forge log lines that way. The filter renders each record once,
escapes control characters, caps its length, and reduces the HTTP server's parse errors to
the exception's type.
"""

from __future__ import annotations

import logging
import re

MAX_LINE = 2000
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_QUIET = ("aiohttp.server", "aiohttp.access")


def clean(text: str, limit: int = MAX_LINE) -> str:
    """`text` with control characters escaped and cut to `limit` characters."""
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


class SafeLogFilter(logging.Filter):
    """Caps and escapes every record; keeps only the exception type for HTTP parse errors."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        super().__init__()
        self.limit = limit

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string must not lose the record
            message = str(record.msg)
        if record.name.startswith(_QUIET) and record.exc_info:
            exc = record.exc_info[1]
            message = f"{message}: {type(exc).__name__} (request content not logged)"
            record.exc_info = None
            record.exc_text = None
        elif record.exc_info is None:
            # multi-line messages stay readable; only control characters other than \n go
            message = "\n".join(clean(line, self.limit) for line in message.split("\n")[:50])
        record.msg = message if len(message) <= self.limit * 2 else message[: self.limit * 2]
        record.args = None
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Add the filter to `logger`'s handlers (the root's by default) and to aiohttp's loggers."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, SafeLogFilter) for f in handler.filters):
            handler.addFilter(SafeLogFilter())
    for name in _QUIET:
        quiet = logging.getLogger(name)
        if not any(isinstance(f, SafeLogFilter) for f in quiet.filters):
            quiet.addFilter(SafeLogFilter())


__all__ = ["SafeLogFilter", "clean", "install"]
