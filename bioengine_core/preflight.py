"""Checks a site before anything starts: each backend's own `preflight` (endpoints, credentials,
resource limits), so `config check` finds what `serve` would otherwise fail on minutes later."""

from __future__ import annotations

import logging
from typing import Any

from .config import Backend, SiteConfig
from .errors import BioEngineError

log = logging.getLogger(__name__)


def _backends(config: SiteConfig) -> list[Backend]:
    found = [config.executor, config.storage, *config.gateways.values()]
    return found + [b for b in config.sources.values() if b is not None]


def run_preflight(config: SiteConfig, *, offline: bool = False) -> list[str]:
    """Problems every configured backend reports, prefixed with the file and section.

    A check that fails unexpectedly is reported as a problem of its backend, never raised.
    """
    label = str(config.path) if config.path else "(defaults)"
    context = config.context()
    problems: list[str] = []
    for backend in _backends(config):
        check: Any = backend.record.preflight
        if check is None:
            continue
        where = f"{label}: [{backend.section}]"
        try:
            found = check(
                settings=backend.settings,
                context=context.for_backend(backend.record.family, backend.record.name),
                offline=offline,
            )
        except BioEngineError as exc:
            found = [str(exc)]
        except Exception as exc:  # a plugin's bug must not hide the other checks
            log.debug("preflight of %s failed", backend.section, exc_info=True)
            found = [f"the {backend.record.name} check itself failed: {type(exc).__name__}: {exc}"]
        problems += [f"{where} {line}" for line in found or []]
    return problems


__all__ = ["run_preflight"]
