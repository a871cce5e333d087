"""pytest plugin shipped with the core: `require_service` turns missing services into CI failures."""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    """True when running under CI (CI=true): missing services then fail instead of skipping."""
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_service(available: bool, what: str) -> None:
    """Skip (locally) or fail (in CI) a test whose real component is not available."""
    if available:
        return
    if in_ci():
        pytest.fail(f"{what} is required in CI but not available", pytrace=False)
    pytest.skip(f"{what} not available")
