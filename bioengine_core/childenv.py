"""Environments for child processes: an allow-list, so secrets of the engine stay in the engine.

`bioengine serve` may hold API tokens, a Hypha admin secret or S3 keys in its environment; a
Triton server, its python stubs or an embedded Hypha server must not inherit them. Every
backend that starts a process builds its environment with `child_env`: the few variables any
program needs (PATH, locale, temp dir, ...), the ones the caller names, and explicit extras.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Mapping

BASE_ALLOW: tuple[str, ...] = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "LC_*",
    "TZ",
    "TMPDIR",
    "TMP",
    "TEMP",
    "LD_LIBRARY_PATH",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "OMP_NUM_THREADS",
    "OPENBLAS_*",
    "MKL_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "NVIDIA_DRIVER_CAPABILITIES",
)
"""Variables every child may inherit: none of them carries a credential."""

CONTAINER_CLIENT_ALLOW: tuple[str, ...] = (
    "XDG_RUNTIME_DIR",
    "XDG_CONFIG_HOME",
    "XDG_DATA_HOME",
    "XDG_CACHE_HOME",
    "DBUS_SESSION_BUS_ADDRESS",
    "CONTAINERS_*",
    "CONTAINER_HOST",
    "CONTAINER_CONNECTION",
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
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
)
"""What a docker/podman client reads besides `BASE_ALLOW` (daemon socket, config, registry auth
file, storage settings, proxies for pulls); the container itself gets only the variables passed
to it explicitly (`--env`)."""

APPTAINER_CLIENT_ALLOW: tuple[str, ...] = ("APPTAINER_*", "SINGULARITY_*")
"""The apptainer/singularity client's own settings (cache, tmp dir, registry login); with
`--cleanenv` only APPTAINERENV_*/SINGULARITYENV_* variables enter the container."""


def _allowed(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def child_env(
    extra: Mapping[str, str] | None = None,
    *,
    allow: Iterable[str] = (),
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment for a child process: allow-listed variables of `base` plus `extra`.

    `base` defaults to this process's environment; `allow` adds names or shell patterns
    (`CONTAINERS_*`) to `BASE_ALLOW`; `extra` is added last and wins.
    """
    source = os.environ if base is None else base
    patterns = (*BASE_ALLOW, *allow)
    env = {k: v for k, v in source.items() if _allowed(k, patterns)}
    env.update(extra or {})
    return env


__all__ = ["APPTAINER_CLIENT_ALLOW", "BASE_ALLOW", "CONTAINER_CLIENT_ALLOW", "child_env"]
