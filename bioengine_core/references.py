"""What a site config points at outside its file: environment variables and files.

`config check` and `serve` check them all before anything starts, so an unset credential
variable is an exit-2 line naming the section, key and variable, not a traceback later.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import BaseModel

from .config import SiteConfig


def references(model: BaseModel, where: str) -> list[tuple[str, str, str]]:
    """(key, kind, value) of every setting that names an environment variable (`env`,
    `*_env`) or a file (`file`, `*_file`), nested models and lists included."""
    found: list[tuple[str, str, str]] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        key = f"{where}{name}"
        if isinstance(value, str) and (name == "env" or name.endswith("_env")):
            found.append((key, "env", value))
        elif isinstance(value, str) and (name == "file" or name.endswith("_file")):
            found.append((key, "file", value))
        elif isinstance(value, BaseModel):
            found += references(value, f"{key}.")
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, BaseModel):
                    found += references(item, f"{key}[{i}].")
    return found


def check_references(config: SiteConfig) -> list[str]:
    """Problems with what settings point at outside the file: environment variables that are
    unset or empty, files that are missing or unreadable. `serve` needs them all at start."""
    label = str(config.path) if config.path else "(defaults)"
    backends = [config.executor, config.storage, *config.gateways.values()]
    backends += [b for b in config.sources.values() if b is not None]
    problems = []
    for backend in backends:
        for key, kind, value in references(backend.settings, ""):
            where = f"{label}: [{backend.section}] key '{key}' = {value!r}"
            if kind == "env" and not os.environ.get(value, "").strip():
                problems.append(f"{where}: environment variable {value} is not set (or empty)")
            elif kind == "file":
                path = Path(value).expanduser()
                path = path if path.is_absolute() else config.config_dir / path
                if not path.is_file() or not os.access(path, os.R_OK):
                    problems.append(f"{where}: no readable file at {path}")
    return problems + _local_models(config, label)


def _local_models(config: SiteConfig, label: str) -> list[str]:
    """Models from this machine (`folder:`, `zip:`, `bundled:`) must be there; other sources
    check their references themselves when they resolve."""
    from .bundled import bundled_path
    from .errors import ModelError
    from .sources import split_ref
    from .util import find_rdf

    problems = []
    for index, model in enumerate(config.models, start=1):
        scheme, rest = split_ref(model.source)
        where = f"{label}: [models #{index}] key 'source' = {model.source!r}"
        path = Path(rest).expanduser()
        relative = "" if path.is_absolute() else " (relative to the config's directory)"
        path = path if path.is_absolute() else config.config_dir / path
        try:
            if scheme == "bundled":
                bundled_path(rest.strip())
            elif scheme == "folder":
                folder = path.parent if path.is_file() and path.suffix == ".yaml" else path
                if not folder.is_dir():
                    raise ModelError(f"no folder at {path}{relative}")
                find_rdf(folder)
            elif scheme == "zip" and not path.is_file():
                raise ModelError(f"no file at {path}{relative}")
        except ModelError as exc:
            problems.append(f"{where}: {exc}")
    return problems


__all__ = ["check_references", "references"]
