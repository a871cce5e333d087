"""Plugin manager: built-ins and entry-point plugins, backend registries, broken/disabled plugins."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import Any

import pluggy

from . import __version__, hookspecs
from .contracts import BackendType
from .errors import PluginError

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "bioengine"
DISABLE_ENV = "BIOENGINE_DISABLE_PLUGINS"

FAMILIES = {
    "executor": "bioengine_register_executors",
    "storage": "bioengine_register_storages",
    "source": "bioengine_register_model_sources",
    "gateway": "bioengine_register_gateways",
}

# Which first-party distribution provides a backend that is not installed, for error messages.
KNOWN_DISTRIBUTIONS = {
    ("executor", "local"): "bioengine-executor-local",
    ("executor", "slurm"): "bioengine-executor-slurm",
    ("executor", "k8s"): "bioengine-executor-k8s",
    ("storage", "s3"): "bioengine-storage-s3",
    ("gateway", "hypha"): "bioengine-gateway-hypha",
}


@dataclass
class PluginInfo:
    """One plugin as `bioengine plugins list` shows it."""

    name: str
    distribution: str
    version: str
    status: str  # "ok" or "broken"
    error: str = ""
    hooks: list[str] = field(default_factory=list)


@dataclass
class Registered:
    """A backend record together with the plugin that registered it."""

    record: BackendType
    plugin: PluginInfo


def disabled_plugins() -> set[str]:
    """Plugin names listed in BIOENGINE_DISABLE_PLUGINS (comma separated)."""
    raw = os.environ.get(DISABLE_ENV, "")
    return {part.strip() for part in raw.split(",") if part.strip()}


class PluginManager:
    """Loads plugins once and indexes the backends they register, by family and name."""

    def __init__(self, *, load_entry_points: bool = True, extra: list[tuple[str, Any]] = ()):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.disabled = disabled_plugins()
        from . import builtin

        self._register("builtin", builtin, "bioengine", __version__)
        for name, module in extra:
            self._register(name, module, "(in-process)", "")
        if load_entry_points:
            self._load_entry_points()
        self.backends: dict[str, dict[str, Registered]] = {f: {} for f in FAMILIES}
        self._collect()

    # ------------------------------------------------------------------ loading
    def _register(self, name: str, module: ModuleType | Any, dist: str, version: str) -> None:
        if name in self.disabled:
            log.info("plugin %s disabled by %s", name, DISABLE_ENV)
            return
        self.pm.register(module, name=name)
        hooks = sorted(h.name for h in self.pm.get_hookcallers(module) or [])
        self.plugins[name] = PluginInfo(name, dist, version, "ok", hooks=hooks)

    def _load_entry_points(self) -> None:
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else ""
            if ep.name in self.disabled:
                continue
            if ep.name in self.plugins:
                other = self.plugins[ep.name].distribution
                raise PluginError(
                    f"two plugins are named '{ep.name}': from distributions '{other}' and '{dist}'"
                )
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must not take the service down
                reason = f"{type(exc).__name__}: {exc}"
                warnings.warn(
                    f"bioengine plugin '{ep.name}' ({dist}) failed to load: {reason}", stacklevel=2
                )
                self.plugins[ep.name] = PluginInfo(ep.name, dist, version, "broken", reason)
                continue
            self._register(ep.name, module, dist, version)

    def _collect(self) -> None:
        for family, hook_name in FAMILIES.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                info = self.plugins[impl.plugin_name]
                try:
                    records = impl.function() or []
                except Exception as exc:
                    info.status, info.error = "broken", f"{hook_name}: {type(exc).__name__}: {exc}"
                    warnings.warn(
                        f"bioengine plugin '{info.name}' is broken: {info.error}", stacklevel=2
                    )
                    continue
                for record in records:
                    if record.family != family:
                        raise PluginError(
                            f"plugin '{info.name}' returned a {record.family} record "
                            f"from {hook_name}"
                        )
                    existing = self.backends[family].get(record.name)
                    if existing is not None:
                        raise PluginError(
                            f"two {family} backends are named '{record.name}': from "
                            f"distributions '{existing.plugin.distribution}' "
                            f"(plugin '{existing.plugin.name}') and '{info.distribution}' "
                            f"(plugin '{info.name}')"
                        )
                    self.backends[family][record.name] = Registered(record, info)

    # ------------------------------------------------------------------ queries
    @property
    def hook(self) -> Any:
        """The pluggy hook relay; call hooks with keyword arguments."""
        return self.pm.hook

    def get(self, family: str, name: str) -> Registered | None:
        """The backend of `family` named `name`, or None."""
        return self.backends[family].get(name)

    def names(self, family: str) -> list[str]:
        """Sorted names of the backends registered for `family`."""
        return sorted(self.backends[family])

    def missing_hint(self, family: str, name: str) -> str:
        """What to install (or enable) for a backend that is not registered."""
        for info in self.plugins.values():
            if info.status == "broken" and name in info.name:
                return f"plugin '{info.name}' is installed but broken: {info.error}"
        dist = KNOWN_DISTRIBUTIONS.get((family, name))
        if dist:
            suffix = ""
            if any(name in d for d in self.disabled):
                suffix = f" (or remove it from {DISABLE_ENV})"
            return f"install it with `pip install {dist}`{suffix}"
        return "no installed plugin provides it"

    def rows(self) -> list[dict[str, str]]:
        """One row per backend and per broken plugin, for `bioengine plugins list`."""
        out = []
        for family, regs in self.backends.items():
            for name, reg in sorted(regs.items()):
                out.append(
                    {
                        "name": name,
                        "family": family,
                        "plugin": reg.plugin.name,
                        "distribution": reg.plugin.distribution,
                        "version": reg.plugin.version,
                        "status": reg.plugin.status,
                        "error": reg.plugin.error,
                    }
                )
        for info in self.plugins.values():
            if info.status == "broken":
                out.append(
                    {
                        "name": info.name,
                        "family": "?",
                        "plugin": info.name,
                        "distribution": info.distribution,
                        "version": info.version,
                        "status": "broken",
                        "error": info.error,
                    }
                )
        return out
