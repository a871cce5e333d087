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


__all__ = ["BASE_ALLOW", "child_env"]
