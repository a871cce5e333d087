"""The engine: builds the model repository, keeps N ready replicas, routes requests, shuts down.

It implements the Service API that gateways expose. Executors and storages are synchronous
and are called from worker threads; everything else runs in one asyncio loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import ModelEntry, SiteConfig
from .contracts import (
    Executor,
    Gateway,
    ModelInfo,
    ModelSource,
    ReplicaSpec,
    ReplicaState,
    ReplicaStatus,
    Service,
    Storage,
)
from .errors import BioEngineError, ExecutorError, ModelError, ModelNotFoundError
from .kserve import HEADER_LEN, check_response, parse_request
from .plugins import PluginManager
from .router import Router, error_message
from .sources import split_ref

log = logging.getLogger("bioengine.engine")


@dataclass
class ServedModel:
    """A model this deployment serves: its package, how it was built, and counters."""

    id: str
    package: Any  # modelpkg.ModelPackage
    built: Any  # repository.BuiltModel
    entry: ModelEntry
    requests: int = 0
    errors: int = 0


@dataclass
class Replica:
    """The engine's view of one replica."""

    status: ReplicaStatus
    routed: bool = False
    successor: str | None = None  # id of the replica started to take over before expiry
    retiring: bool = False
    adopted: bool = False
    failed_since: float | None = None


class Engine(Service):
    """Composes the configured backends and runs the serve loop."""

    def __init__(self, config: SiteConfig, plugins: PluginManager | None = None):
        from .metrics import Metrics

        self.config = config
        self.plugins = plugins or PluginManager()
        self.state_dir = config.state_dir
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.context = config.context(progress=lambda message: self._say(message))
        self.executor: Executor = self._make(config.executor)
        self.storage: Storage = self._make(config.storage)
        self.sources: dict[str, ModelSource] = {}
        for name, backend in config.sources.items():
            for scheme in getattr(backend.record, "schemes", ()) or (name,):
                self.sources[scheme] = self._make(backend)
        self.gateways: dict[str, Gateway] = {n: self._make(b) for n, b in config.gateways.items()}
        self.models: dict[str, ServedModel] = {}
        self.replicas: dict[str, Replica] = {}
        self.target = config.engine.replicas
        self.router = Router(
            stall_after=config.engine.stall_timeout, probe_timeout=config.engine.probe_timeout
        )
        self.router.on_replica_error.append(self._on_replica_error)
        self.metrics = Metrics()
        self._supervisor: asyncio.Task | None = None
        self._stopping = False
        self.started_at = time.time()
        self.progress: Any = None  # callable(str) for start-up progress lines

    def _make(self, backend: Any) -> Any:
        context = self.context.for_backend(backend.record.family, backend.record.name)
        return backend.record.factory(settings=backend.settings, context=context)

    # ================================================================ models
    def _resolve(self, ref: str) -> Path:
        scheme, _ = split_ref(ref)
        source = self.sources.get(scheme)
        if source is None:
            known = ", ".join(sorted(self.sources)) or "none"
            raise ModelError(f"no model source handles {scheme!r} in {ref!r} (installed: {known})")
        return source.resolve(ref, cache_dir=self.state_dir / "sources")

    def prepare_model(self, entry: ModelEntry) -> ServedModel:
        """Resolve, validate, build and publish one model (blocking; runs in a thread)."""
        from .modelpkg import load_package
        from .repository import build_triton_model

        folder = self._resolve(entry.source)
        package = load_package(folder, model_id=entry.id)
        build_root = self.state_dir / "build"
        build_root.mkdir(parents=True, exist_ok=True)
        built = build_triton_model(
            package,
            build_root,
            weight_format=entry.weight_format,
            backend=entry.backend,
            available_backends=self.executor.triton_backends(),
            max_batch_size=entry.max_batch_size,
            gpus=self._replica_gpus(),
        )
        self.storage.put(built.name, built.path)
        self.plugins.hook.bioengine_model_published(model_id=built.name, storage=self.storage)
        self._say(
            f"model {built.name}: {built.weight_format} weights, {built.backend} backend, "
            f"published to {self.storage.location().uri}"
        )
        return ServedModel(built.name, package, built, entry)

    def _replica_gpus(self) -> list[int] | None:
        """GPU indices a replica sees, when the executor tells (model instance groups use them)."""
        return self.executor.replica_gpus()

    def spec(self) -> ReplicaSpec:
        """What every replica runs: Triton over the storage's repository with our models."""
        return self.config.replica_spec(
            self.storage.location(), list(self.models), gpus=len(self._replica_gpus() or [])
        )

    # ================================================================ life cycle
    def _say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)
        else:
            log.info(message)

    async def start(self) -> None:
        """Prepare models, adopt or start replicas, wait until ready, start gateways."""
        for entry in self.config.models:
            served = await asyncio.to_thread(self.prepare_model, entry)
            if served.id in self.models:
                raise ModelError(f"two configured models resolve to the id {served.id!r}")
            self.models[served.id] = served
        await self._adopt_or_start()
        await self._wait_ready(min(1, self.target))
        for name, gateway in self.gateways.items():
            await gateway.start(self)
            self._say(f"gateway {name}: {gateway.info().get('url', '')}")
        self._supervisor = asyncio.create_task(self._supervise(), name="bioengine-supervisor")
        self.plugins.hook.bioengine_engine_started(engine=self, config=self.config)

    async def _adopt_or_start(self) -> None:
        spec = self.spec()
        if self.executor.manages_replicas:
            await asyncio.to_thread(self.executor.scale, spec, self.target)
            return
        found = await asyncio.to_thread(self.executor.list, self.config.engine.name)
        for status in found:
            self.replicas[status.replica_id] = Replica(status, adopted=True)
            self._say(
                f"adopted running replica {status.replica_id} ({status.state.value}, "
                f"{status.url or 'no endpoint yet'})"
            )
        alive = [r for r in self.replicas.values() if r.status.state.alive]
        for extra in alive[self.target :]:
            await self._stop_replica(extra.status.replica_id, reason="more than configured")
        for _ in range(self.target - len(alive)):
            await self._start_replica(spec)

    async def _start_replica(
        self, spec: ReplicaSpec | None = None, successor_of: str | None = None
    ) -> str:
        status = await asyncio.to_thread(self.executor.start, spec or self.spec())
        self.replicas[status.replica_id] = Replica(status)
        if successor_of and successor_of in self.replicas:
            self.replicas[successor_of].successor = status.replica_id
        why = f" to succeed {successor_of}" if successor_of else ""
        self._say(f"started replica {status.replica_id}{why} ({status.state.value})")
        self.plugins.hook.bioengine_replica_state_changed(replica=status, previous=None)
        return status.replica_id

    async def _stop_replica(self, replica_id: str, *, reason: str) -> None:
        replica = self.replicas.get(replica_id)
        if replica is not None:
            replica.retiring = True
        self.router.drain(replica_id)
        await self.router.wait_idle(replica_id, timeout=self.config.engine.request_timeout)
        await self.router.release(replica_id)
        self._say(f"stopping replica {replica_id} ({reason})")
        try:
            await asyncio.to_thread(
                self.executor.stop, replica_id, grace=self.config.engine.stop_grace
            )
        except BioEngineError as exc:
            log.error("could not stop replica %s: %s", replica_id, exc)
        self.replicas.pop(replica_id, None)

    async def _wait_ready(self, needed: int) -> None:
        """Refresh replica states until `needed` are routed; show progress; fail on timeout."""
        deadline = time.monotonic() + self.config.engine.ready_timeout
        last_line = ""
        while True:
            await self._refresh()
            ready = self.router.ready_count()
            if ready >= needed:
                # enough to serve: the supervisor brings any others up in the background
                rest = "; the rest continue starting" if ready < self.target else ""
                self._say(f"{ready}/{self.target} replica(s) ready{rest}")
                return
            states = ", ".join(
                f"{rid}: {r.status.state.value}"
                + (f" ({r.status.message})" if r.status.message else "")
                for rid, r in sorted(self.replicas.items())
            )
            line = f"waiting for replicas: {ready}/{self.target} ready; {states}"
            if line != last_line:
                self._say(line)
                last_line = line
            hopeless = [
                (rid, r)
                for rid, r in self.replicas.items()
                if r.status.unsatisfiable
            ]
            if hopeless and ready == 0:
                rid, rep = hopeless[0]
                raise ExecutorError(
                    f"replica {rid} can never start: {rep.status.message or 'unsatisfiable'}"
                )
            if time.monotonic() > deadline:
                logs = ""
                for rid in list(self.replicas)[:2]:
                    try:
                        tail = await asyncio.to_thread(self.executor.logs, rid, tail=20)
                        logs += f"\n--- last log lines of {rid} ---\n{tail}"
                    except BioEngineError:
                        pass
                raise ExecutorError(
                    f"replicas not ready after {self.config.engine.ready_timeout:.0f} s "
                    f"({states}){logs}"
                )
            await asyncio.sleep(0.5)

    async def _refresh(self) -> None:
        """Poll executor states; route newly ready replicas, unroute failed ones."""
        if self.executor.manages_replicas:
            try:
                listed = await asyncio.to_thread(self.executor.list, self.config.engine.name)
            except BioEngineError as exc:
                # the platform keeps replicas alive; keep routing to the known ones meanwhile
                log.warning("cannot list replicas (%s); keeping current routes", exc)
                return
            seen = set()
            for status in listed:
                seen.add(status.replica_id)
                rep = self.replicas.setdefault(status.replica_id, Replica(status))
                await self._apply(rep, status)
            for rid in list(self.replicas):
                if rid not in seen:
                    await self.router.release(rid)
                    self.replicas.pop(rid, None)
            return
        for rid, rep in list(self.replicas.items()):
            if rep.retiring:
                continue
            try:
                status = await asyncio.to_thread(self.executor.status, rid)
            except BioEngineError as exc:
                status = ReplicaStatus(
                    rid, ReplicaState.UNKNOWN, url=rep.status.url, message=str(exc)
                )
            await self._apply(rep, status)

    async def _apply(self, rep: Replica, status: ReplicaStatus) -> None:
        previous = rep.status.state
        if status.labels == {} and rep.status.labels:
            status.labels = rep.status.labels
        rep.status = status
        if previous != status.state:
            log.info(
                "replica %s: %s -> %s %s",
                status.replica_id,
                previous.value,
                status.state.value,
                status.message,
            )
            self.plugins.hook.bioengine_replica_state_changed(
                replica=status, previous=previous.value
            )
        if status.state == ReplicaState.READY and status.url and not rep.routed:
            if rep.adopted:
                await self._ensure_models_loaded(status.url)
            self.router.add(status.replica_id, status.url)
            rep.routed = True
        elif status.state != ReplicaState.READY and rep.routed:
            self.router.drain(status.replica_id)
            rep.routed = False
        self.metrics.replicas_ready.set(self.router.ready_count())

    async def _ensure_models_loaded(self, url: str) -> None:
        """Make an adopted replica load the current version of every model."""
        session = await self.router.session()
        for name in self.models:
            async with session.post(f"{url}/v2/repository/models/{name}/load") as resp:
                if resp.status != 200:
                    log.warning(
                        "adopted replica %s could not load %s: %s", url, name, await resp.text()
                    )

    def _on_replica_error(self, replica_id: str) -> None:
        rep = self.replicas.get(replica_id)
        if rep is not None:
            # no new requests until the next health check says it is still ready
            self.router.drain(replica_id)
            rep.routed = False

    async def _supervise(self) -> None:
        interval = self.config.engine.health_interval
        while not self._stopping:
            try:
                await self._supervise_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # the supervisor must survive any backend hiccup
                log.exception("supervisor iteration failed")
            await asyncio.sleep(interval)

    async def _supervise_once(self) -> None:
        await self._refresh()
        if self.executor.manages_replicas:
            self._write_status()
            return
        now = time.time()
        lead = self.config.engine.successor_lead
        for rid, rep in list(self.replicas.items()):
            state = rep.status.state
            if rep.retiring:
                continue
            if state in (ReplicaState.FAILED, ReplicaState.STOPPED):
                self._say(
                    f"replica {rid} {state.value}: {rep.status.message or 'ended'}; replacing it"
                )
                await self._stop_replica(rid, reason=f"{state.value}")
                continue
            if state == ReplicaState.UNKNOWN:
                rep.failed_since = rep.failed_since or now
                if now - rep.failed_since > 60:
                    await self._stop_replica(rid, reason="unknown for 60 s")
                continue
            rep.failed_since = None
            expires = rep.status.expires_at
            if expires and expires - now < lead and rep.successor is None:
                await self._start_replica(successor_of=rid)
            if rep.successor:
                succ = self.replicas.get(rep.successor)
                if succ is None:
                    rep.successor = None
                elif succ.routed:
                    await self._stop_replica(rid, reason="its successor is ready")
        active = [
            r
            for r in self.replicas.values()
            if not r.retiring and r.status.state.alive and not self._is_successor(r)
        ]
        for _ in range(self.target - len(active)):
            await self._start_replica()
        for extra in active[self.target :] if len(active) > self.target else []:
            await self._stop_replica(extra.status.replica_id, reason="scaled down")
        self._write_status()

    def _is_successor(self, rep: Replica) -> bool:
        return any(
            r.successor == rep.status.replica_id
            for r in self.replicas.values()
            if r is not rep and r.status.replica_id in self.replicas
        )

    async def stop(self, *, stop_replicas: bool = True) -> None:
        """Stop gateways, drain requests, stop our replicas."""
        self._stopping = True
        self.plugins.hook.bioengine_engine_stopping(engine=self, config=self.config)
        if self._supervisor is not None:
            self._supervisor.cancel()
            try:
                await self._supervisor
            except (asyncio.CancelledError, Exception):
                pass
        for name, gateway in self.gateways.items():
            try:
                await gateway.stop()
            except Exception:
                log.exception("gateway %s failed to stop", name)
        if stop_replicas:
            if self.executor.manages_replicas:
                await asyncio.to_thread(self.executor.scale, self.spec(), 0)
            else:
                await asyncio.gather(
                    *(self._stop_replica(rid, reason="shutdown") for rid in list(self.replicas))
                )
        await self.router.close()
        self.executor.close()
        self._write_status(stopped=True)

    # ================================================================ service API
    def _model(self, model_id: str) -> ServedModel:
        model = self.models.get(model_id)
        if model is None:
            raise ModelNotFoundError(model_id, list(self.models))
        return model

    def list_models(self) -> list[ModelInfo]:
        out = []
        for m in self.models.values():
            pkg = m.package
            out.append(
                ModelInfo(
                    id=m.id,
                    name=pkg.name,
                    description=pkg.description,
                    inputs=[_tensor_info(t) for t in pkg.inputs],
                    outputs=[_tensor_info(t) for t in pkg.outputs],
                    weight_format=m.built.weight_format,
                    tags=list(pkg.tags),
                )
            )
        return out

    def get_model(self, model_id: str) -> dict[str, Any]:
        return self._model(model_id).package.rdf

    def timeout_for(self, model_id: str, timeout: float | None = None) -> float:
        """The deadline of one request: the caller's, capped by the model's (or the engine's) limit."""
        model = self.models.get(model_id)
        limit = (model.entry.timeout if model and model.entry.timeout else None) or (
            self.config.engine.request_timeout
        )
        # a caller may ask for less time than the model's limit, never for more
        return min(timeout, limit) if timeout and timeout > 0 else limit

    async def infer(
        self,
        model_id: str,
        inputs: dict[str, np.ndarray] | list[np.ndarray],
        *,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        from .modelpkg import validate_inputs

        model = self._model(model_id)
        pkg = model.package
        if isinstance(inputs, (list, tuple)):
            if len(inputs) != len(pkg.inputs):
                from .errors import InvalidInputError

                raise InvalidInputError(
                    f"model '{model_id}' takes {len(pkg.inputs)} input(s) "
                    f"({', '.join(t.id for t in pkg.inputs)}), got {len(inputs)}"
                )
            inputs = {t.id: np.asarray(a) for t, a in zip(pkg.inputs, inputs, strict=True)}
        else:
            inputs = {k: np.asarray(v) for k, v in inputs.items()}
        started = time.perf_counter()
        model.requests += 1
        status = "ok"
        try:
            validate_inputs(pkg, inputs)
            return await self.router.infer(
                model_id,
                inputs,
                [t.id for t in pkg.outputs],
                timeout=self.timeout_for(model_id, timeout),
            )
        except BioEngineError:
            model.errors += 1
            status = "error"
            raise
        finally:
            self.metrics.observe(model_id, status, time.perf_counter() - started)

    async def infer_raw(
        self, model_id: str, body: bytes, headers: dict[str, str], *, timeout: float | None = None
    ) -> tuple[int, bytes, dict[str, str]]:
        model = self._model(model_id)
        model.requests += 1
        started = time.perf_counter()
        status = 500
        try:
            request = parse_request(
                model_id,
                body,
                headers.get(HEADER_LEN),
                package=model.package,
                check=lambda specs: self.check_inputs(model_id, specs),
            )
            parts, upstream_headers = request.build()
            status, data, out = await self.router.request(
                "POST",
                f"/v2/models/{model_id}/infer",
                body=parts,
                headers=upstream_headers,
                timeout=self.timeout_for(model_id, timeout or request.timeout),
                verify=lambda st, data, got: check_response(request, st, data, got),
            )
            if status != 200:
                # Triton's error text, rebuilt as our own JSON (a replica's 5xx stays a 5xx)
                data = json.dumps({"error": error_message(data)[:2000]}).encode()
                out = {"Content-Type": "application/json"}
            return status, data, out
        finally:
            if status != 200:
                model.errors += 1
            self.metrics.observe(
                model_id, "ok" if status == 200 else "error", time.perf_counter() - started
            )

    def would_time_out(self, model_id: str, timeout: float | None) -> bool:
        if not timeout or timeout <= 0 or model_id not in self.models:
            return False
        return self.router.hopeless(
            f"/v2/models/{model_id}/infer", self.timeout_for(model_id, timeout)
        )

    def check_inputs(self, model_id: str, specs: dict[str, tuple[tuple[int, ...], str]]) -> None:
        from .modelpkg import validate_input_specs

        validate_input_specs(self._model(model_id).package, specs)

    async def test_model(self, model_id: str) -> dict[str, Any]:
        model = self._model(model_id)
        pkg = model.package
        inputs = {tid: np.load(path) for tid, path in pkg.test_inputs.items()}
        started = time.perf_counter()
        try:
            outputs = await self.infer(model_id, inputs)
        except BioEngineError as exc:
            return {"model_id": model_id, "passed": False, "error": str(exc)}
        report: dict[str, Any] = {
            "model_id": model_id,
            "passed": True,
            "outputs": {},
            "execution_time": time.perf_counter() - started,
        }
        for tid, path in pkg.test_outputs.items():
            expected = np.load(path)
            got = outputs.get(tid)
            if got is None or got.shape != expected.shape:
                report["passed"] = False
                report["outputs"][tid] = {
                    "error": f"shape {None if got is None else got.shape}"
                    f" != expected {expected.shape}"
                }
                continue
            diff = np.abs(got.astype(np.float64) - expected.astype(np.float64))
            ok = bool(np.allclose(got, expected, atol=1e-4, rtol=1e-4))
            report["outputs"][tid] = {
                "max_abs_error": float(diff.max()) if diff.size else 0.0,
                "passed": ok,
            }
            report["passed"] = report["passed"] and ok
        return report

    def status(self) -> dict[str, Any]:
        replicas = []
        for rid, rep in sorted(self.replicas.items()):
            s = rep.status
            route = self.router.routes.get(rid)
            replicas.append(
                {
                    "id": rid,
                    "state": s.state.value,
                    "url": s.url,
                    "host": s.host,
                    "message": s.message,
                    "routed": rep.routed,
                    "adopted": rep.adopted,
                    "started_at": s.started_at,
                    "expires_at": s.expires_at,
                    "successor": rep.successor,
                    "requests": route.requests if route else 0,
                    "outstanding": route.outstanding if route else 0,
                    "details": s.details,
                }
            )
        return {
            "deployment": self.config.engine.name,
            "executor": self.config.executor.settings.kind,
            "storage": {
                "kind": self.config.storage.settings.kind,
                "uri": self.storage.location().uri,
            },
            "target_replicas": self.target,
            "ready_replicas": self.router.ready_count(),
            "replicas": replicas,
            "models": [
                {
                    "id": m.id,
                    "weight_format": m.built.weight_format,
                    "backend": m.built.backend,
                    "requests": m.requests,
                    "errors": m.errors,
                }
                for m in self.models.values()
            ],
            "gateways": {name: g.info() for name, g in self.gateways.items()},
            "uptime_s": time.time() - self.started_at,
        }

    def _write_status(self, stopped: bool = False) -> None:
        data = self.status()
        data["stopped"] = stopped
        data["written_at"] = time.time()
        path = self.state_dir / "status.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(path)

    async def load_model(self, ref: str, *, model_id: str | None = None) -> str:
        entry = ModelEntry(source=ref, id=model_id)
        served = await asyncio.to_thread(self.prepare_model, entry)
        self.models[served.id] = served
        await self._for_each_routed("POST", f"/v2/repository/models/{served.id}/load")
        await self._respec()
        return served.id

    async def unload_model(self, model_id: str) -> None:
        self._model(model_id)
        await self._for_each_routed("POST", f"/v2/repository/models/{model_id}/unload")
        self.models.pop(model_id, None)
        await self._respec()

    async def _respec(self) -> None:
        """Let a platform that manages replicas start new ones with the current model list."""
        if self.executor.manages_replicas:
            await asyncio.to_thread(self.executor.scale, self.spec(), self.target)

    async def _for_each_routed(self, method: str, path: str) -> None:
        session = await self.router.session()
        for route in list(self.router.routes.values()):
            async with session.request(method, route.url + path) as resp:
                if resp.status != 200:
                    raise ExecutorError(f"replica {route.replica_id}: {await resp.text()}")

    async def scale(self, replicas: int) -> None:
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        self.target = replicas
        if self.executor.manages_replicas:
            await asyncio.to_thread(self.executor.scale, self.spec(), replicas)
        else:
            await self._supervise_once()


def _tensor_info(t: Any) -> dict[str, Any]:
    return {
        "id": t.id,
        "dtype": t.dtype,
        "shape": list(t.shape),
        "axes": list(t.axes),
        "description": getattr(t, "description", ""),
    }
