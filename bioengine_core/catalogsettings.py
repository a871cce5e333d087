"""`[catalog]`: the settings of catalog mode and the allow-list rules (`config check` uses them
without starting anything)."""

from __future__ import annotations

import fnmatch
import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")
"""What a model id in a request may look like (zoo ids such as `affable-shark`)."""


class CatalogSettings(BaseModel):
    """`[catalog]`: serve the models of a collection on demand, within a budget."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        False, description="Serve allowed models of the collection on first request."
    )
    source: str = Field(
        "bioimageio",
        pattern=r"^[a-z][a-z0-9+.-]*$",
        description="Model source (scheme) that ids are resolved through; its section "
        "([sources.NAME]) says where the collection is.",
    )
    allow: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Ids, id patterns ('affable-*') or 'tag:NAME' that may be served.",
    )
    deny: list[str] = Field(
        default_factory=list, description="Ids, patterns or 'tag:NAME' never served."
    )
    preload: list[str] = Field(
        default_factory=list, description="Ids loaded at start (they may be unloaded later)."
    )
    max_loaded: int = Field(
        0, ge=0, le=10000, description="Most models loaded per replica (0: no limit)."
    )
    load_timeout: float = Field(
        300.0, gt=0, le=86400, description="Seconds a request waits for its model to load."
    )
    retry_failed_after: float = Field(
        60.0, ge=0, description="Seconds before a model whose load failed is tried again."
    )
    shared_runner: bool = Field(
        True,
        description="Run catalog models' python-backend pipelines in one shared process per "
        "replica (a thin stub per model) instead of one Python runtime per model.",
    )
    listing_refresh: float = Field(
        3600.0, gt=0, description="Seconds between reloads of the collection listing."
    )

    @field_validator("allow", "deny", "preload")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        for item in value:
            body = item.removeprefix("tag:")
            if not body or len(item) > 100 or any(c.isspace() or c in "/\\" for c in body):
                raise ValueError(f"{item!r} is not an id, an id pattern or 'tag:NAME'")
        return value


def matches(model_id: str, tags: list[str], patterns: list[str]) -> bool:
    """Whether an id (with its tags) is named by one of `patterns` (ids, globs, 'tag:NAME')."""
    for p in patterns:
        if p.startswith("tag:"):
            if any(fnmatch.fnmatchcase(t.lower(), p[4:].lower()) for t in tags):
                return True
        elif fnmatch.fnmatchcase(model_id, p):
            return True
    return False


def check_catalog(settings: CatalogSettings, schemes: set[str], label: str) -> list[str]:
    """Problems `config check` reports for `[catalog]`: an unknown source, a preload the allow
    and deny lists exclude."""
    problems = []
    if settings.enabled and settings.source not in schemes:
        problems.append(
            f"{label}: [catalog] key 'source' = {settings.source!r}: no model source handles "
            f"'{settings.source}:' (installed: {', '.join(sorted(schemes))})"
        )
    id_rules = not any(p.startswith("tag:") for p in settings.allow)
    for model_id in settings.preload:
        if not MODEL_ID_RE.fullmatch(model_id):
            problems.append(f"{label}: [catalog] key 'preload': {model_id!r} is not a model id")
        elif (id_rules and not matches(model_id, [], settings.allow)) or matches(
            model_id, [], [p for p in settings.deny if not p.startswith("tag:")]
        ):
            problems.append(
                f"{label}: [catalog] key 'preload': {model_id!r} is not allowed by 'allow' / 'deny'"
            )
    return problems


__all__ = ["MODEL_ID_RE", "CatalogSettings", "check_catalog", "matches"]
