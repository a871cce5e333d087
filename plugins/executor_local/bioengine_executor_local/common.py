"""Helpers shared by the process and container executors: ids, ports, labels, files."""

from __future__ import annotations

import json
import os
import re
import socket
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DEPLOYMENT_LABEL = "bioengine.deployment"
REPLICA_LABEL = "bioengine.replica"
URL_LABEL = "bioengine.url"


SECRET_HINTS = ("SECRET", "TOKEN", "PASSWORD", "KEY", "CREDENTIAL")

REPLICA_ALLOW = ("CUDA_*",)
"""Engine variables a Triton process inherits besides `childenv.BASE_ALLOW` (CUDA tuning)."""

CONTAINER_CLIENT_ALLOW = (
    "XDG_RUNTIME_DIR",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "XDG_CACHE_HOME",
    "DBUS_SESSION_BUS_ADDRESS",
    "SSH_AUTH_SOCK",
    "CONTAINERS_*",
    "CONTAINER_HOST",
    "CONTAINER_CONNECTION",
    "CONTAINER_SSHKEY",
    "CONTAINER_PASSPHRASE",
    "PODMAN_*",
    "REGISTRY_AUTH_FILE",
    "STORAGE_DRIVER",
    "STORAGE_OPTS",
    "DOCKER_HOST",
    "DOCKER_CONFIG",
    "DOCKER_CONTEXT",
    "DOCKER_TLS_VERIFY",
    "DOCKER_CERT_PATH",
    "DOCKER_API_VERSION",
    "DOCKER_DEFAULT_PLATFORM",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
)
"""Engine variables the docker/podman client needs (daemon socket, config, registry auth file,
proxies for pulls); the container itself gets only what is passed with `--env`."""

APPTAINER_CLIENT_ALLOW = (*CONTAINER_CLIENT_ALLOW, "APPTAINER_*", "SINGULARITY_*")
"""The apptainer/singularity client's own settings (cache, tmp dir, registry login); with
`--cleanenv` only APPTAINERENV_*/SINGULARITYENV_* variables enter the container."""


def is_secret_name(name: str) -> bool:
    """True for variable names that usually hold credentials (values hidden in previews)."""
    return any(hint in name.upper() for hint in SECRET_HINTS)


def new_replica_id(deployment: str) -> str:
    """A unique, file- and container-name-safe replica id that shows its deployment."""
    slug = re.sub(r"[^a-zA-Z0-9_.-]+", "-", deployment).strip("-.") or "replica"
    return f"{slug[:40]}-{uuid.uuid4().hex[:8]}"


def free_ports(address: str, count: int, exclude: Iterable[int] = ()) -> list[int]:
    """`count` distinct TCP ports that are free on `address` now (bound with port 0)."""
    taken = set(exclude)
    ports: list[int] = []
    sockets: list[socket.socket] = []
    try:
        while len(ports) < count:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((address, 0))
            port = sock.getsockname()[1]
            if port not in taken:
                taken.add(port)
                ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


def connect_host(address: str) -> str:
    """The host to put in a replica's url: a wildcard bind address is reached via loopback."""
    return "127.0.0.1" if address in ("0.0.0.0", "", "::") else address


def replica_labels(deployment: str, replica_id: str, labels: dict[str, str]) -> dict[str, str]:
    """The spec's labels plus the ones every replica carries (deployment, replica id)."""
    return {**labels, DEPLOYMENT_LABEL: deployment, REPLICA_LABEL: replica_id}


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` atomically (temp file + rename) so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:6]}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None if it is absent or unreadable."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


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
