"""The engine: builds the configured backends and runs a deployment from start to shutdown.

It composes the parts, each with one job: the model catalog (`catalog`), the replica
supervisor (`supervisor`), the router, and the service facade (`service`) that gateways see.
Executors and storages are synchronous and are called from worker threads; everything else runs
in one asyncio loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from .catalog import ModelCatalog
from .catalogmode import CatalogMode
from .config import SiteConfig
from .contracts import Executor, Gateway, ModelSource, ReplicaSpec, Storage
from .metrics import Metrics
from .plugins import PluginManager
from .router import Router
from .service import EngineService
from .supervisor import ReplicaSupervisor
from .util import write_json

log = logging.getLogger("bioengine.engine")


class Engine:
    """Composes the configured backends and runs the serve loop."""

    def __init__(
        self,
        config: SiteConfig,
        plugins: PluginManager | None = None,
        *,
        progress: Callable[[str], None] | None = None,
    ):
        self.config = config
        self.plugins = plugins or PluginManager()
        self.progress = progress
        self.state_dir = config.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.context = config.context(progress=self._say)
        self.executor: Executor = self._make(config.executor)
        self.storage: Storage = self._make(config.storage)
        sources: dict[str, ModelSource] = {}
        for name, backend in config.sources.items():
            for scheme in getattr(backend.record, "schemes", ()) or (name,):
                sources[scheme] = self._make(backend)
        self.gateways: dict[str, Gateway] = {n: self._make(b) for n, b in config.gateways.items()}
        self.metrics = Metrics()
        self.router = Router(
            stall_after=config.engine.stall_timeout, probe_timeout=config.engine.probe_timeout
        )
        self.catalog = ModelCatalog(
            sources=sources,
            storage=self.storage,
            executor=self.executor,
            state_dir=self.state_dir,
            on_published=lambda name: self.plugins.hook.bioengine_model_published(
                model_id=name, storage=self.storage
            ),
            say=self._say,
        )
        self.supervisor = ReplicaSupervisor(
            executor=self.executor,
            router=self.router,
            settings=config.engine,
            spec=self.spec,
            model_ids=self.catalog.ids,
            hook=self.plugins.hook,
            say=self._say,
            on_ready_count=self.metrics.replicas_ready.set,
            autoscale=config.autoscale,
            on_decision=lambda d: self.metrics.autoscale_decisions.labels(d.kind).inc(),
        )
        self._configured_ids: set[str] = set()  # [[models]]: never unloaded by catalog mode
        self._system_models: list[str] = []  # loaded on every replica, never listed (the runner)
        self.catalog_mode: CatalogMode | None = None
        if config.catalog.enabled:
            self.catalog_mode = CatalogMode(
                config.catalog,
                catalog=self.catalog,
                supervisor=self.supervisor,
                pinned=lambda: set(self._configured_ids),
                say=self._say,
            )
        self.started_at = time.time()
        self.service = EngineService(
            config=config,
            catalog=self.catalog,
            supervisor=self.supervisor,
            router=self.router,
            metrics=self.metrics,
            gateway_info=lambda: {name: g.info() for name, g in self.gateways.items()},
            started_at=self.started_at,
            catalog_mode=self.catalog_mode,
        )
        self._stopping = asyncio.Event()
        self._supervising: asyncio.Task | None = None

    def _make(self, backend: Any) -> Any:
        context = self.context.for_backend(backend.record.family, backend.record.name)
        return backend.record.factory(settings=backend.settings, context=context)

    @property
    def models(self) -> dict[str, Any]:
        """The served models by id (the catalog's)."""
        return self.catalog.models

    def spec(self) -> ReplicaSpec:
        """What every replica runs: Triton over the storage's repository with our models."""
        return self.config.replica_spec(
            self.storage.location(),
            self.catalog.ids() + self._system_models,
            gpus=len(self.executor.replica_gpus() or []),
        )

    def _say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)
        else:
            log.info(message)

    # ---------------------------------------------------------------- life cycle
    async def start(self) -> None:
        """Prepare models, adopt or start replicas, wait until ready, start gateways."""
        for entry in self.config.models:
            served = await asyncio.to_thread(self.catalog.prepare, entry)
            self.catalog.add(served)
            self._configured_ids.add(served.id)
        if self.catalog_mode is not None and self.config.catalog.shared_runner:
            self._system_models.append(await asyncio.to_thread(self.catalog.publish_runner))
        await self.supervisor.start()
        await self.supervisor.wait_ready(min(1, self.supervisor.target))
        if self.catalog_mode is not None:
            await self.catalog_mode.refresh_listing()
            offered = len(self.catalog_mode.listing)
            self._say(
                f"catalog: {offered} model(s) in the collection; allowed ones load on request"
                + (f" (listing: {self.catalog_mode.listing_error})" if not offered else "")
            )
            await self.catalog_mode.preload()
        for name, gateway in self.gateways.items():
            await gateway.start(self.service)
            self._say(f"gateway {name}: {gateway.info().get('url', '')}")
        self._supervising = asyncio.create_task(self._supervise(), name="bioengine-supervisor")
        self.plugins.hook.bioengine_engine_started(engine=self, config=self.config)

    async def _supervise(self) -> None:
        async def write_status_after_each_round() -> None:
            while not self._stopping.is_set():
                self.write_status()
                try:
                    await asyncio.wait_for(
                        self._stopping.wait(), self.config.engine.health_interval
                    )
                except TimeoutError:
                    pass

        await asyncio.gather(self.supervisor.run(self._stopping), write_status_after_each_round())

    async def stop(self, *, stop_replicas: bool = True) -> None:
        """Stop gateways, drain requests, stop our replicas."""
        self._stopping.set()
        self.plugins.hook.bioengine_engine_stopping(engine=self, config=self.config)
        if self._supervising is not None:
            self._supervising.cancel()
            try:
                await self._supervising
            except (asyncio.CancelledError, Exception):
                pass
        for name, gateway in self.gateways.items():
            try:
                await gateway.stop()
            except Exception:
                log.exception("gateway %s failed to stop", name)
        if stop_replicas:
            await self.supervisor.stop_all()
        await self.router.close()
        self.executor.close()
        self.write_status(stopped=True)

    def write_status(self, stopped: bool = False) -> None:
        """`STATE_DIR/status.json`: what `bioengine status` shows when the gateway is down."""
        data = self.service.status()
        data["stopped"] = stopped
        data["written_at"] = time.time()
        write_json(self.state_dir / "status.json", data)

    # ---------------------------------------------------------------- shortcuts
    def status(self) -> dict[str, Any]:
        """The service's status (see `Service.status`)."""
        return self.service.status()

    async def scale(self, replicas: int) -> None:
        """Change the target number of replicas."""
        await self.service.scale(replicas)


__all__ = ["Engine"]
