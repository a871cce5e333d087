"""Catalog mode: serve any allowed model of a collection (the zoo) on first request.

A request for an allowed model that is not loaded resolves, verifies, builds and publishes its
package and loads it on every ready replica (Triton's explicit model control) while the request
waits; concurrent first requests share one load; over the `max_loaded` budget the least
recently used model is unloaded. Every model of the collection has a visible state.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from .catalogsettings import MODEL_ID_RE, CatalogSettings, check_catalog, matches
from .errors import BioEngineError, InferenceError, ModelNotFoundError, UnknownModelError

if TYPE_CHECKING:
    from .catalog import ModelCatalog
    from .supervisor import ReplicaSupervisor

log = logging.getLogger("bioengine.catalog")


class ModelState(str, Enum):
    """Where a model of the catalog stands."""

    AVAILABLE = "available"  # allowed, not loaded
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass
class Entry:
    """One model of the catalog as status shows it."""

    id: str
    state: ModelState = ModelState.AVAILABLE
    reason: str = ""
    last_used: float = 0.0
    loads: int = 0
    unloads: int = 0
    load_seconds: float | None = None
    changed_at: float = field(default_factory=time.time)

    def set(self, state: ModelState, reason: str = "") -> None:
        self.state, self.reason, self.changed_at = state, reason, time.time()


class CatalogMode:
    """Loads allowed models on demand and keeps the loaded set within the budget."""

    def __init__(
        self,
        settings: CatalogSettings,
        *,
        catalog: ModelCatalog,
        supervisor: ReplicaSupervisor,
        pinned: Callable[[], set[str]],
        say: Callable[[str], None],
    ) -> None:
        self.settings = settings
        self.catalog = catalog
        self.supervisor = supervisor
        self.pinned = pinned
        self.say = say
        self.entries: dict[str, Entry] = {}
        self.listing: list[dict[str, Any]] = []
        self.listing_at = 0.0
        self.listing_error = ""
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._built: dict[str, Any] = {}  # unloaded, still published: a reload needs no build
        self._lock = asyncio.Lock()
        self.events: list[str] = []

    # ---------------------------------------------------------------- collection
    async def refresh_listing(self, force: bool = False) -> list[dict[str, Any]]:
        """The collection's models (cached for `listing_refresh` s; the last good copy when the
        collection is unreachable)."""
        if (
            not force
            and self.listing
            and time.time() - self.listing_at < self.settings.listing_refresh
        ):
            return self.listing
        try:
            found = await asyncio.to_thread(self.catalog.listing, self.settings.source)
            self.listing, self.listing_error = found, ""
        except BioEngineError as exc:
            self.listing_error = str(exc)
            log.warning("catalog listing: %s", exc)
        self.listing_at = time.time()
        return self.listing

    def _tags(self, model_id: str) -> list[str]:
        for item in self.listing:
            if item.get("id") == model_id:
                return [str(t) for t in item.get("tags") or []]
        served = self.catalog.models.get(model_id)
        return list(served.package.tags) if served else []

    def allowed(self, model_id: str) -> bool:
        """Whether the site offers this model (allow list minus deny list)."""
        tags = self._tags(model_id)
        s = self.settings
        return matches(model_id, tags, s.allow) and not matches(model_id, tags, s.deny)

    def entry(self, model_id: str) -> Entry:
        """The model's status record (created as `available`)."""
        return self.entries.setdefault(model_id, Entry(model_id))

    def touch(self, model_id: str) -> None:
        """Mark a model used now (for least-recently-used unloading)."""
        self.entry(model_id).last_used = time.monotonic()

    # ---------------------------------------------------------------- loading
    async def ensure(self, model_id: str) -> None:
        """Return once `model_id` is loaded; load it first if it is allowed. 404 for a model
        the site does not offer, 503 while a load takes longer than `load_timeout`."""
        if model_id in self.catalog.models:
            self.touch(model_id)
            return
        if not MODEL_ID_RE.fullmatch(model_id):
            raise InferenceError(
                f"invalid model id {model_id[:100]!r}: letters, digits, '-', '_' and '.' only",
                status=400,
            )
        if not self.listing_at:
            await self.refresh_listing()
        if not self.allowed(model_id):
            raise ModelNotFoundError(model_id, self.catalog.ids(), offered="this site's catalog")
        entry = self.entry(model_id)
        task = self._loading.get(model_id)
        if task is None:
            wait = self.settings.retry_failed_after - (time.time() - entry.changed_at)
            if entry.state == ModelState.FAILED and wait > 0:
                raise self._failed(entry, retry_in=wait)
            task = asyncio.create_task(self._load(model_id), name=f"load {model_id}")
            self._loading[model_id] = task
        try:
            await asyncio.wait_for(asyncio.shield(task), self.settings.load_timeout)
        except TimeoutError:
            raise InferenceError(
                f"model '{model_id}' is still loading after {self.settings.load_timeout:g} s "
                "([catalog] load_timeout); try again shortly",
                status=503,
            ) from None
        if entry.state == ModelState.FAILED:
            raise self._failed(entry)
        self.touch(model_id)

    def _failed(self, entry: Entry, retry_in: float | None = None) -> InferenceError:
        when = f"; tried again after {retry_in:.0f} s" if retry_in else ""
        status = 404 if entry.reason.startswith("not in the collection") else 503
        return InferenceError(
            f"model '{entry.id}' could not be loaded: {entry.reason}{when}", status=status
        )

    async def _load(self, model_id: str) -> None:
        entry = self.entry(model_id)
        entry.set(ModelState.LOADING, "requested")
        started = time.monotonic()
        self.say(f"model {model_id}: loading on demand")
        try:
            served = self._built.pop(model_id, None) or await asyncio.to_thread(
                functools.partial(
                    self.catalog.prepare_ref,
                    self.settings.source,
                    model_id,
                    shared_runner=self.settings.shared_runner,
                )
            )
            async with self._lock:
                await self._make_room(for_model=model_id)
                self.catalog.add(served, replace=True)
                try:
                    await self.supervisor.broadcast(model_id, "load")
                except BioEngineError:
                    self.catalog.remove(model_id)
                    await self._quiet_unload(model_id)
                    raise
                await self.supervisor.respec()
        except UnknownModelError as exc:
            entry.set(ModelState.FAILED, f"not in the collection: {exc}")
        except BioEngineError as exc:
            entry.set(ModelState.FAILED, str(exc).splitlines()[0][:500])
        except Exception as exc:  # a bug must not leave the model 'loading' forever
            log.exception("loading %s failed", model_id)
            entry.set(ModelState.FAILED, f"internal error: {type(exc).__name__}")
        else:
            entry.loads += 1
            entry.load_seconds = time.monotonic() - started
            entry.set(ModelState.READY)
            self.say(f"model {model_id}: ready (loaded in {entry.load_seconds:.1f} s)")
        finally:
            self._loading.pop(model_id, None)
        if entry.state == ModelState.FAILED:
            self.say(f"model {model_id}: failed: {entry.reason}")

    async def _make_room(self, *, for_model: str) -> None:
        """Unload least recently used models until one more fits the budget (lock held)."""
        budget = self.settings.max_loaded
        if not budget:
            return
        while len(self.catalog.models) >= budget:
            pinned = self.pinned()
            idle = [
                m
                for m in self.catalog.models.values()
                if m.id not in pinned and m.id != for_model and m.inflight == 0
            ]
            if not idle:
                self.say(
                    f"model {for_model}: over the budget ([catalog] max_loaded = {budget}) "
                    "but every loaded model is pinned or busy; loading it anyway"
                )
                return
            victim = min(idle, key=lambda m: self.entry(m.id).last_used).id
            await self.unload(
                victim, reason=f"least recently used; [catalog] max_loaded = {budget}"
            )

    async def unload(self, model_id: str, *, reason: str) -> None:
        """Stop serving a loaded model (lock held by the caller when it is part of a load)."""
        served = self.catalog.models.get(model_id)
        if served is not None:
            self._built[model_id] = served  # its Triton model stays published in the storage
        self.catalog.remove(model_id)
        await self._quiet_unload(model_id)
        entry = self.entry(model_id)
        entry.unloads += 1
        entry.set(ModelState.AVAILABLE, f"unloaded at {time.strftime('%H:%M:%S')}: {reason}")
        line = f"model {model_id}: unloaded ({reason})"
        self.events = (self.events + [f"{time.strftime('%H:%M:%S')} {line}"])[-20:]
        self.say(line)

    async def _quiet_unload(self, model_id: str) -> None:
        try:
            await self.supervisor.broadcast(model_id, "unload")
        except BioEngineError as exc:
            log.warning("unloading %s: %s", model_id, exc)
        await self.supervisor.respec()

    async def preload(self) -> None:
        """Load the `preload` models (a failure is reported, not fatal)."""
        for model_id in self.settings.preload:
            try:
                await self.ensure(model_id)
            except InferenceError as exc:
                self.say(f"preload {model_id}: {exc}")

    # ---------------------------------------------------------------- describing
    def search(self, query: str = "", limit: int = 50) -> list[dict[str, Any]]:
        """Models of the catalog (loaded or not) whose id, name, description or tags contain
        every word of `query`, with their state."""
        words = query.lower().split()
        rows: dict[str, dict[str, Any]] = {}
        for item in self.listing:
            mid = str(item.get("id", ""))
            if mid and self.allowed(mid):
                rows[mid] = {
                    "id": mid,
                    "name": str(item.get("name") or mid),
                    "description": str(item.get("description") or ""),
                    "tags": [str(t) for t in item.get("tags") or []],
                }
        for info in self.catalog.infos():
            rows[info.id] = {**rows.get(info.id, {}), **info.__dict__}
        out = []
        for mid, row in sorted(rows.items()):
            text = " ".join([mid, row["name"], row["description"], *row["tags"]]).lower()
            if all(w in text for w in words):
                entry = self.entries.get(mid)
                state = ModelState.READY if mid in self.catalog.models else None
                row["state"] = (state or (entry.state if entry else ModelState.AVAILABLE)).value
                if entry and entry.reason and row["state"] != "ready":
                    row["reason"] = entry.reason
                out.append(row)
        return out[:limit]

    def rows(self) -> dict[str, Any]:
        """The catalog for `status`: settings in short, every model that was touched, events."""
        now = time.monotonic()
        models = []
        for mid, e in sorted(self.entries.items()):
            state = ModelState.READY if mid in self.catalog.models else e.state
            models.append(
                {
                    "id": mid,
                    "state": state.value,
                    "reason": e.reason if state != ModelState.READY else "",
                    "idle_s": round(now - e.last_used, 1) if e.last_used else None,
                    "loads": e.loads,
                    "unloads": e.unloads,
                    "load_seconds": e.load_seconds,
                }
            )
        return {
            "source": self.settings.source,
            "max_loaded": self.settings.max_loaded,
            "loaded": len(self.catalog.models),
            "offered": len(self.listing),
            "listing_error": self.listing_error,
            "models": models,
            "events": list(self.events),
        }


__all__ = [
    "MODEL_ID_RE",
    "CatalogMode",
    "CatalogSettings",
    "Entry",
    "ModelState",
    "check_catalog",
    "matches",
]
