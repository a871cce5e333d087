"""The model-zoo packages shipped inside the `bioengine` package, so that a plain
`pip install bioengine` has a model to serve (`bundled:NAME`, `bioengine models example`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import ModelError

ROOT = Path(__file__).parent / "bundled_models"


@dataclass(frozen=True)
class BundledModel:
    """One shipped package: its name (the `bundled:` reference), folder and description."""

    name: str
    path: Path
    title: str
    description: str
    weights: tuple[str, ...]


def bundled_models() -> list[BundledModel]:
    """Every shipped package, by name."""
    found = []
    for rdf in sorted(ROOT.glob("*/bioimageio.yaml")):
        data = yaml.safe_load(rdf.read_text()) or {}
        found.append(
            BundledModel(
                name=rdf.parent.name,
                path=rdf.parent,
                title=str(data.get("name", rdf.parent.name)),
                description=str(data.get("description", "")),
                weights=tuple(sorted(data.get("weights") or {})),
            )
        )
    return found


def bundled_path(name: str) -> Path:
    """The folder of the shipped package `name`; ModelError listing the names otherwise."""
    models = {m.name: m for m in bundled_models()}
    if name not in models:
        raise ModelError(
            f"no bundled model {name!r}; bundled: {', '.join(sorted(models)) or 'none'} "
            "(see `bioengine models bundled`)"
        )
    return models[name].path


EXAMPLE = """\
# A BioEngine site on this machine, written by `bioengine models example`.
# Check it with `bioengine config check --config {file}`, serve it with
# `bioengine serve --config {file}`. Relative paths are relative to this file.

[engine]
name = "{name}"
state_dir = ".bioengine/{name}"   # pid files, logs, the built model repository
replicas = 1

[executor]
kind = "local"        # Triton processes on this machine (from the nvidia-pytriton wheel)
mode = "process"

[storage]
kind = "local"        # the model repository in state_dir

[gateways.http]
kind = "http"         # KServe v2 / Triton HTTP protocol, /health, /metrics
host = "127.0.0.1"    # loopback only; see docs/operator-guide.md before opening it
port = {port}
{models}"""


def example_config(models: list[str], *, name: str = "local", port: int = 9000, file: str) -> str:
    """A complete local site config serving the bundled `models` (checked names)."""
    for model in models:
        bundled_path(model)
    entries = "".join(f'\n[[models]]\nsource = "bundled:{m}"\n' for m in models)
    return EXAMPLE.format(name=name, port=port, models=entries, file=file)


__all__ = ["BundledModel", "bundled_models", "bundled_path", "example_config"]
