"""The local podman test image that container-mode tests of executors share.

`.ci/build-podman-image.sh` builds it (no registry is reachable on the project's machines).
"""

from __future__ import annotations

import os
import shutil
import subprocess

IMAGE = os.environ.get("BIOENGINE_TEST_IMAGE", "localhost/bioengine-triton-test:latest")
"""The image with the host's venv and Triton bind-mounted at run time."""

PODMAN_OPTIONS = [
    "--runtime",
    "runc",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=1024:1024",
]
"""crun fails on these machines; runc works with explicit ulimits (ENVIRONMENT.md)."""


def podman_image_available(image: str = IMAGE) -> bool:
    """True when podman runs and the test image exists."""
    if not shutil.which("podman"):
        return False
    try:
        run = subprocess.run(["podman", "image", "exists", image], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return run.returncode == 0
