"""Helpers shared by the process and container executors: ids, labels, allow-lists, log tails.

The deployment label, free ports, JSON files and the wildcard-to-loopback rule come from
`bioengine_core.util`; the container clients' allow-lists from `bioengine_core.childenv`.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

from bioengine_core import childenv
from bioengine_core.util import DEPLOYMENT_LABEL, REPLICA_LABEL

URL_LABEL = "bioengine.url"


SECRET_HINTS = ("SECRET", "TOKEN", "PASSWORD", "KEY", "CREDENTIAL")

REPLICA_ALLOW = ("CUDA_*",)
"""Engine variables a Triton process inherits besides `childenv.BASE_ALLOW` (CUDA tuning)."""

CONTAINER_CLIENT_ALLOW = (
    *childenv.CONTAINER_CLIENT_ALLOW,
    "SSH_AUTH_SOCK",
    "CONTAINER_SSHKEY",
    "CONTAINER_PASSPHRASE",
    "DOCKER_DEFAULT_PLATFORM",
)
"""Engine variables the docker/podman client needs: the core's `CONTAINER_CLIENT_ALLOW`, plus a
remote podman connection's ssh agent and key, and docker's default platform."""

APPTAINER_CLIENT_ALLOW = (*CONTAINER_CLIENT_ALLOW, *childenv.APPTAINER_CLIENT_ALLOW)
"""What the apptainer/singularity client gets (its own APPTAINER_*/SINGULARITY_* settings)."""


def is_secret_name(name: str) -> bool:
    """True for variable names that usually hold credentials (values hidden in previews)."""
    return any(hint in name.upper() for hint in SECRET_HINTS)


def new_replica_id(deployment: str) -> str:
    """A unique, file- and container-name-safe replica id that shows its deployment."""
    slug = re.sub(r"[^a-zA-Z0-9_.-]+", "-", deployment).strip("-.") or "replica"
    return f"{slug[:40]}-{uuid.uuid4().hex[:8]}"


def replica_labels(deployment: str, replica_id: str, labels: dict[str, str]) -> dict[str, str]:
    """The spec's labels plus the ones every replica carries (deployment, replica id)."""
    return {**labels, DEPLOYMENT_LABEL: deployment, REPLICA_LABEL: replica_id}


def tail_file(path: Path, lines: int) -> str:
    """The last `lines` lines of a text file ('' if absent), reading at most its last 1 MiB."""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - (1 << 20)))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode(errors="replace")
    return "\n".join(text.splitlines()[-lines:]) if lines > 0 else ""


def replica_ports(settings: object, exclude: list[int]) -> list[int]:
    """Three free ports (HTTP, gRPC, metrics) on the settings' address, from `port_range` when
    one is set; ExecutorError naming the setting when the range has too few."""
    from bioengine_core.errors import ExecutorError
    from bioengine_core.util import free_ports

    within = settings.ports_within()  # type: ignore[attr-defined]
    try:
        return free_ports(settings.address, 3, exclude=exclude, within=within)  # type: ignore[attr-defined]
    except OSError as exc:
        if within is None:
            raise ExecutorError(f"no free ports on {settings.address}: {exc}") from exc  # type: ignore[attr-defined]
        raise ExecutorError(f"[executor] port_range = {settings.port_range!r}: {exc}") from exc  # type: ignore[attr-defined]
