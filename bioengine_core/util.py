"""Helpers that the core, the plugins and third-party backends share (a public module).

One home for small things every backend needs alike: the deployment label, free ports, atomic
JSON files, the address a wildcard bind is reached at, the weight formats BioEngine serves (and
what their optional runtimes need), finding a package's description file.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import socket
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .errors import ModelError

DEPLOYMENT_LABEL = "bioengine.deployment"
"""Label key every replica carries with its deployment name (adoption after restarts)."""
REPLICA_LABEL = "bioengine.replica"
"""Label key with the replica's own id."""

WEIGHT_FORMATS = (
    "onnx",
    "torchscript",
    "pytorch_state_dict",
    "tensorflow_saved_model_bundle",
    "keras_hdf5",
)
"""Weight formats BioEngine can serve, most preferred first."""

OPTIONAL_RUNTIMES = {
    "tensorflow_saved_model_bundle": ("tensorflow", "TensorFlow", "tensorflow"),
    "keras_hdf5": ("tensorflow", "TensorFlow", "tensorflow"),
}
"""Weight format -> (module, its name for people, the `bioengine` extra that installs it), for
formats whose runtime BioEngine checks in the serving environment before it builds a model."""

RDF_NAMES = ("bioimageio.yaml", "rdf.yaml")
"""File names of a package's description, in the order they are looked for."""

WILDCARDS = ("", "0.0.0.0", "::", "[::]", "*")


def missing_runtimes(weight_formats: Iterable[str], python_paths: Sequence[str]) -> dict[str, str]:
    """Weight format -> why the environment on `python_paths` cannot run it (the runtime it lacks,
    the command that installs it), for the formats of OPTIONAL_RUNTIMES that it cannot run."""
    lacking, paths = {}, [str(p) for p in python_paths]
    for wf in weight_formats:
        module, label, extra = OPTIONAL_RUNTIMES.get(wf) or (None, "", "")
        if module and importlib.machinery.PathFinder.find_spec(module, paths) is None:
            where = ", ".join(paths) or "no site-packages"
            lacking[wf] = (
                f"{label}, which the serving environment ({where}) lacks: "
                f"pip install 'bioengine[{extra}]'"
            )
    return lacking


def connect_host(address: str) -> str:
    """The host to reach a server bound to `address`: a wildcard is reached via loopback."""
    if address in WILDCARDS:
        return "127.0.0.1"  # dual-stack listeners on :: answer there too
    return address


def url_host(host: str) -> str:
    """`host` as it goes into a URL (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def parse_port_range(text: str) -> range:
    """`"9100-9199"` as `range(9100, 9200)`; ValueError with the reason when it is not one
    (used by the executors' `port_range` settings, for firewalls that open a fixed range)."""
    first, sep, last = text.strip().partition("-")
    if not sep or not first.strip().isdigit() or not last.strip().isdigit():
        raise ValueError(f"{text!r} is not a port range like '9100-9199'")
    low, high = int(first), int(last)
    if not 1024 <= low <= high <= 65535:
        raise ValueError(f"{text!r}: ports must satisfy 1024 <= first <= last <= 65535")
    return range(low, high + 1)


def free_ports(
    address: str, count: int, exclude: Iterable[int] = (), within: range | None = None
) -> list[int]:
    """`count` distinct TCP ports that are free on `address` now: any (bound with port 0
    together), or the lowest free ones `within` a range (OSError when it has too few)."""
    taken = set(exclude)
    ports: list[int] = []
    sockets: list[socket.socket] = []
    host = address.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    candidates = iter(within) if within is not None else None
    try:
        while len(ports) < count:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            if candidates is None:
                sock.bind((host, 0))
            else:
                port = next((p for p in candidates if p not in taken), None)
                if port is None:
                    raise OSError(
                        f"no {count} free TCP ports on {host} in {within.start}-{within.stop - 1}"
                        f" (found {len(ports)}); widen port_range or stop what uses them"
                    )
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            port = sock.getsockname()[1]
            if port not in taken:
                taken.add(port)
                ports.append(port)
    finally:
        for sock in sockets:
            sock.close()
    return ports


def free_port(address: str = "127.0.0.1") -> int:
    """One TCP port that is free on `address` now."""
    return free_ports(address, 1)[0]


def write_json(path: Path, data: Any) -> None:
    """Write `data` atomically and durably (temp file, fsync, rename): readers never see half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:6]}.tmp")
    try:
        with open(tmp, "w") as fh:
            json.dump(data, fh, indent=1, sort_keys=True, default=str)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None if it is absent, unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def find_rdf(folder: Path) -> Path:
    """The description file of a package folder (or the file itself); ModelError if none."""
    folder = Path(folder)
    if folder.is_file():
        return folder
    if not folder.is_dir():
        raise ModelError(f"model package not found: {folder}")
    for name in RDF_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(folder.glob("*.bioimageio.yaml"))
    if found:
        return found[0]
    raise ModelError(
        f"{folder} is not a bioimage.io model package: no {' or '.join(RDF_NAMES)} in it"
    )


__all__ = [
    "DEPLOYMENT_LABEL",
    "RDF_NAMES",
    "REPLICA_LABEL",
    "OPTIONAL_RUNTIMES",
    "WEIGHT_FORMATS",
    "connect_host",
    "find_rdf",
    "free_port",
    "free_ports",
    "missing_runtimes",
    "parse_port_range",
    "read_json",
    "url_host",
    "write_json",
]
