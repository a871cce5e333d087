"""Shared fixtures for the core's tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from core_helpers import ROOT


@pytest.fixture(scope="session")
def thirdparty_site(tmp_path_factory) -> Path:
    """The test-only third-party plugin, really installed (pip --target) into a temp dir."""
    target = tmp_path_factory.mktemp("thirdparty")
    src = ROOT / "tests" / "fixtures" / "thirdparty_plugin"
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
            str(src),
        ],
        check=True,
        capture_output=True,
        cwd=build,
        timeout=300,
    )
    return target
