"""Shared fixtures for the core's tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from core_helpers import ROOT


def _install(tmp_path_factory, fixture: str) -> Path:
    """Really install a test-only plugin from tests/fixtures (pip --target) into a temp dir."""
    target = tmp_path_factory.mktemp(fixture)
    build = tmp_path_factory.mktemp("build")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT / "tests" / "fixtures" / fixture),
        ],
        check=True,
        capture_output=True,
        cwd=build,
        timeout=300,
    )
    return target


@pytest.fixture(scope="session")
def thirdparty_site(tmp_path_factory) -> Path:
    """The test-only third-party executor plugin, installed into a temp dir."""
    return _install(tmp_path_factory, "thirdparty_plugin")


@pytest.fixture(scope="session")
def contract_gateway_site(tmp_path_factory) -> Path:
    """The test-only gateway that uses the Service contract alone, installed into a temp dir."""
    return _install(tmp_path_factory, "contract_gateway")
