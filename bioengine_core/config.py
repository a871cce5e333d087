"""Site configuration: one TOML file plus BIOENGINE_* environment overrides, validated whole.

The core's own sections are validated by the models here; each backend section (`[executor]`,
`[storage]`, `[gateways.NAME]`, `[sources.NAME]`) by the settings model of the backend its
`kind` names. Every problem names the file, the section, the key, the value and what is allowed.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from .autoscale import AutoscaleSettings
from .catalogsettings import CatalogSettings, check_catalog
from .contracts import BackendContext, BackendSettings, BackendType, ReplicaSpec, RepositoryLocation
from .errors import ConfigError
from .plugins import PluginManager
from .sources import split_ref
from .util import DEPLOYMENT_LABEL

ENV_PREFIX = "BIOENGINE_"
WeightFormat = Literal[
    "onnx", "torchscript", "pytorch_state_dict", "tensorflow_saved_model_bundle", "keras_hdf5"
]


class EngineSettings(BaseModel):
    """`[engine]`: the deployment as a whole."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        "bioengine",
        pattern=r"^[a-z0-9][a-z0-9-]{0,40}$",
        description="Deployment name; replicas are labelled with it.",
    )
    state_dir: str = Field(
        "~/.cache/bioengine", description="Where pid files, logs and the built repository live."
    )
    replicas: int = Field(1, ge=0, le=64, description="Number of inference-server replicas.")
    ready_timeout: float = Field(
        300.0, gt=0, description="Seconds to wait for a replica to be ready."
    )
    health_interval: float = Field(2.0, gt=0, description="Seconds between health checks.")
    stop_grace: float = Field(10.0, ge=0, description="Seconds between SIGTERM and SIGKILL.")
    request_timeout: float = Field(60.0, gt=0, description="Default per-request timeout (s).")
    stall_timeout: float = Field(
        3.0,
        gt=0,
        description="Seconds a replica may go without answering while requests are in flight "
        "before the router probes its liveness (a frozen replica's requests are then resent).",
    )
    probe_timeout: float = Field(
        2.0, gt=0, description="Seconds the liveness probe of a quiet replica may take."
    )
    max_queue_per_model: int = Field(
        1000, ge=0, description="Requests one model may have in flight or waiting; more get 429."
    )
    job_retention: float = Field(
        3600.0, gt=0, description="Seconds a finished job's answer is kept."
    )
    successor_lead: float = Field(
        60.0, ge=0, description="Start a successor this many seconds before a replica expires."
    )


class ModelEntry(BaseModel):
    """One `[[models]]` entry: a model to serve."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="Reference: folder:PATH, zip:PATH, PATH, ...")
    id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9_.-]+$", description="Model id (default: from the package)."
    )
    weight_format: WeightFormat | None = Field(
        None, description="Weights to serve (default: first available of onnx, torchscript, ...)."
    )
    backend: Literal["auto", "python", "native"] = Field(
        "auto", description="Triton backend: native onnxruntime/pytorch, python, or auto."
    )
    max_batch_size: int = Field(8, ge=0, description="Largest batch Triton forms (0: no batching).")
    timeout: float | None = Field(None, gt=0, description="Per-request timeout for this model (s).")


class _Sections(BaseSettings):
    """The top-level shape; backend sections stay dicts until their kind is known."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", case_sensitive=False
    )

    engine: EngineSettings = Field(default_factory=EngineSettings)
    executor: dict[str, Any] = Field(default_factory=lambda: {"kind": "local"})
    storage: dict[str, Any] = Field(default_factory=lambda: {"kind": "local"})
    gateways: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"http": {}})
    sources: dict[str, dict[str, Any]] = Field(default_factory=dict)
    models: list[ModelEntry] = Field(default_factory=list)
    catalog: CatalogSettings = Field(default_factory=CatalogSettings)
    autoscale: AutoscaleSettings = Field(default_factory=AutoscaleSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment overrides the file, and the file (passed as init kwargs) the defaults.
        return (env_settings, init_settings)


@dataclass
class Backend:
    """A configured backend: its section name, record and validated settings."""

    section: str
    record: BackendType
    settings: BackendSettings


@dataclass
class SiteConfig:
    """A fully validated site configuration."""

    path: Path | None
    engine: EngineSettings
    executor: Backend
    storage: Backend
    gateways: dict[str, Backend]
    sources: dict[str, Backend]
    models: list[ModelEntry]
    raw: dict[str, Any] = field(default_factory=dict)
    catalog: CatalogSettings = field(default_factory=CatalogSettings)
    autoscale: AutoscaleSettings = field(default_factory=AutoscaleSettings)

    @property
    def config_dir(self) -> Path:
        """Directory that relative paths in the config are relative to."""
        return self.path.parent.resolve() if self.path else Path.cwd()

    @property
    def state_dir(self) -> Path:
        """The engine's state directory, absolute."""
        p = Path(self.engine.state_dir).expanduser()
        return p if p.is_absolute() else (self.config_dir / p).resolve()

    def context(self, progress: Any = None) -> BackendContext:
        """The context every backend factory of this deployment receives."""
        return BackendContext(
            deployment=self.engine.name,
            state_dir=self.state_dir,
            config_dir=self.config_dir,
            progress=progress,
        )

    def replica_spec(
        self, location: RepositoryLocation, models: list[str], *, gpus: int = 0
    ) -> ReplicaSpec:
        """What every replica of this deployment runs (also what plugin previews show)."""
        return ReplicaSpec(
            deployment=self.engine.name,
            repository=location,
            models=sorted(models),
            labels={DEPLOYMENT_LABEL: self.engine.name},
            env=dict(location.env),
            gpus=gpus,
        )

    def redacted(self) -> dict[str, Any]:
        """The whole config as plain data with secrets masked (for `config check`)."""
        return {
            "engine": self.engine.model_dump(),
            "executor": self.executor.settings.model_dump(mode="json"),
            "storage": self.storage.settings.model_dump(mode="json"),
            "gateways": {k: g.settings.model_dump(mode="json") for k, g in self.gateways.items()},
            "sources": {k: s.settings.model_dump(mode="json") for k, s in self.sources.items()},
            "models": [m.model_dump() for m in self.models],
            "catalog": self.catalog.model_dump(),
            "autoscale": self.autoscale.model_dump(),
        }


def _env_name(section: str, key: str) -> str:
    parts = [p for p in section.split(".") if p and not p.startswith("#")] + [key]
    return ENV_PREFIX + "__".join(part.upper() for part in parts)


def _describe(file: str, section: str, err: dict[str, Any], allowed: list[str]) -> str:
    loc = [str(x) for x in err.get("loc", ())]
    key = ".".join(loc) if loc else "(section)"
    value = err.get("input")
    origin = file
    env = _env_name(section, loc[0]) if loc else ""
    if env and env in {k.upper() for k in os.environ}:
        origin = f"environment variable {env}"
    kind = err.get("type")
    if kind == "extra_forbidden":
        hint = f"unknown key; allowed keys: {', '.join(allowed)}"
        return f"{origin}: [{section}] key '{key}': {hint}"
    if kind == "missing":
        return f"{origin}: [{section}] key '{key}': required key is missing"
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{origin}: [{section}] key '{key}' = {shown}: {err.get('msg')}"


def _validate(model: type[BaseModel], data: dict[str, Any], file: str, section: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        allowed = sorted(model.model_fields)
        problems = [_describe(file, section, e, allowed) for e in exc.errors()]
        raise ConfigError("\n".join(problems), problems=problems) from None


def _read(path: str | Path | None, label: str) -> dict[str, Any]:
    """The TOML file as a dict ({} without a file); ConfigError for a missing or broken file."""
    if path is None:
        return {}
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{label}: no such config file")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{label}: not valid TOML: {exc}") from None


def _merge(data: dict[str, Any], overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`data` with command-line overrides laid over its sections (validated like the file)."""
    merged = dict(data)
    for section, values in overrides.items():
        merged[section] = {**merged.get(section, {}), **values}
    return merged


def _core_sections(data: dict[str, Any], label: str) -> _Sections:
    """The core's own sections validated; ConfigError listing every problem."""
    try:
        return _Sections(**data)
    except ValidationError as exc:
        problems = [_section_problem(e, label) for e in exc.errors()]
        raise ConfigError("\n".join(problems), problems=problems) from None


def _section_problem(e: Any, label: str) -> str:
    loc = [str(x) for x in e["loc"]]
    if e["type"] == "extra_forbidden" and len(loc) == 1:
        allowed = ", ".join(sorted(_Sections.model_fields))
        return f"{label}: unknown section [{loc[0]}]; allowed: {allowed}"
    if loc and loc[0] == "models" and len(loc) > 1 and loc[1].isdigit():
        section, rest = f"models #{int(loc[1]) + 1}", loc[2:]
        allowed = sorted(ModelEntry.model_fields)
    else:
        section, rest = (loc[0] if loc else "?"), loc[1:]
        allowed = sorted(EngineSettings.model_fields) if section == "engine" else []
    return _describe(label, section, {**e, "loc": rest}, allowed)


class _Backends:
    """Validates backend sections by the settings model of the kind each names; collects
    problems instead of stopping at the first."""

    def __init__(self, plugins: PluginManager, label: str) -> None:
        self.plugins = plugins
        self.label = label
        self.problems: list[str] = []

    def build(
        self, family: str, section: str, raw: dict[str, Any], default_kind: str
    ) -> Backend | None:
        raw = dict(raw)
        kind = raw.setdefault("kind", default_kind)
        reg = self.plugins.get(family, kind)
        if reg is None:
            names = ", ".join(self.plugins.names(family)) or "none"
            self.problems.append(
                f"{self.label}: [{section}] key 'kind' = {kind!r}: no {family} named {kind!r} "
                f"is installed (installed: {names}); {self.plugins.missing_hint(family, kind)}"
            )
            return None
        try:
            settings = _validate(reg.record.settings, raw, self.label, section)
        except ConfigError as exc:
            self.problems.extend(exc.problems)
            return None
        return Backend(section, reg.record, settings)

    def sources(self, configured: dict[str, dict[str, Any]]) -> dict[str, Backend | None]:
        """Every installed source (configured or with defaults); unknown sections reported."""
        found = {
            name: self.build("source", f"sources.{name}", configured.get(name, {}), name)
            for name in self.plugins.names("source")
        }
        for name in configured:
            if name not in found:
                self.build("source", f"sources.{name}", configured[name], name)
        return found

    def check_models(self, models: list[ModelEntry], catalog: CatalogSettings) -> None:
        """Each model's scheme has a source; no id is used twice; `[catalog]` is consistent."""
        schemes = {
            scheme
            for name in self.plugins.names("source")
            for scheme in (
                getattr(self.plugins.get("source", name).record, "schemes", ()) or (name,)
            )
        }
        for index, model in enumerate(models, start=1):
            scheme, _ = split_ref(model.source)
            if scheme not in schemes:
                self.problems.append(
                    f"{self.label}: [models #{index}] key 'source' = {model.source!r}: no model "
                    f"source handles '{scheme}:' (installed: {', '.join(sorted(schemes))})"
                )
        ids = [m.id for m in models if m.id]
        for dup in sorted({i for i in ids if ids.count(i) > 1}):
            self.problems.append(
                f"{self.label}: [models] id {dup!r} is used by more than one model"
            )
        self.problems.extend(check_catalog(catalog, schemes, self.label))


def load_config(
    path: str | Path | None,
    plugins: PluginManager | None = None,
    *,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> SiteConfig:
    """Read, merge with BIOENGINE_* and command-line `overrides` (`{"engine": {"replicas": 2}}`),
    and validate every section of a site config; ConfigError listing every problem."""
    plugins = plugins or PluginManager()
    label = str(path) if path else "(defaults)"
    data = _read(path, label)
    sections = _core_sections(_merge(data, overrides or {}), label)
    backends = _Backends(plugins, label)
    executor = backends.build("executor", "executor", sections.executor, "local")
    storage = backends.build("storage", "storage", sections.storage, "local")
    gateways = {
        name: backends.build("gateway", f"gateways.{name}", raw, name)
        for name, raw in sections.gateways.items()
    }
    sources = backends.sources(sections.sources)
    backends.check_models(sections.models, sections.catalog)
    if backends.problems:
        raise ConfigError("\n".join(backends.problems), problems=backends.problems)
    return SiteConfig(
        path=Path(path).resolve() if path else None,
        engine=sections.engine,
        executor=executor,  # type: ignore[arg-type]
        storage=storage,  # type: ignore[arg-type]
        gateways=gateways,  # type: ignore[arg-type]
        sources=sources,  # type: ignore[arg-type]
        models=sections.models,
        raw=data,
        catalog=sections.catalog,
        autoscale=sections.autoscale,
    )


def config_schema(plugins: PluginManager | None = None) -> dict[str, Any]:
    """JSON schema of the whole config, with each installed backend's section as a `oneOf`."""
    plugins = plugins or PluginManager()

    def one_of(family: str) -> dict[str, Any]:
        variants = []
        for name in plugins.names(family):
            schema = plugins.get(family, name).record.settings.model_json_schema()
            schema.setdefault("properties", {})["kind"] = {"const": name}
            schema["title"] = f"{family} '{name}'"
            variants.append(schema)
        return {"oneOf": variants}

    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "BioEngine site.toml",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "engine": EngineSettings.model_json_schema(),
            "executor": one_of("executor"),
            "storage": one_of("storage"),
            "gateways": {"type": "object", "additionalProperties": one_of("gateway")},
            "sources": {"type": "object", "additionalProperties": one_of("source")},
            "models": {"type": "array", "items": ModelEntry.model_json_schema()},
            "catalog": CatalogSettings.model_json_schema(),
            "autoscale": AutoscaleSettings.model_json_schema(),
        },
    }
