"""The service facade: the one object gateways see (the `Service` contract, implemented).

It answers the service API from the model catalog, the replica supervisor and the router:
model listing and metadata, inference (validated, rebuilt, routed), model tests, status,
readiness, metrics, forwarded Triton GETs and the admin calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import numpy as np

from .catalog import ModelCatalog, ServedModel
from .catalogmode import CatalogMode
from .config import ModelEntry, SiteConfig
from .contracts import ModelInfo, Service
from .errors import BioEngineError, InferenceError, InvalidInputError, OverloadedError
from .jobs import JOB_TIMEOUT, JobStore
from .kserve import HEADER_LEN, check_response, parse_request
from .metrics import Metrics
from .router import Router, error_message
from .supervisor import ReplicaSupervisor

log = logging.getLogger("bioengine.service")

TRITON_GETS = {"metadata": "", "ready": "/ready", "config": "/config", "stats": "/stats"}
"""What `triton_get` forwards: the suffix of `/v2/models/ID[/versions/N]` per kind."""


class EngineService(Service):
    """The engine's models and replicas as the service API."""

    def __init__(
        self,
        *,
        config: SiteConfig,
        catalog: ModelCatalog,
        supervisor: ReplicaSupervisor,
        router: Router,
        metrics: Metrics,
        gateway_info: Any,
        started_at: float,
        catalog_mode: CatalogMode | None = None,
    ) -> None:
        self.config = config
        self.catalog = catalog
        self.supervisor = supervisor
        self.router = router
        self.metrics = metrics
        self.gateway_info = gateway_info
        self.started_at = started_at
        self.catalog_mode = catalog_mode
        self._tilers: dict[str, Any] = {}  # model id -> tiling.Tiler (built on first use)
        self.jobs = JobStore(config.engine.job_retention)

    # ---------------------------------------------------------------- models
    def list_models(self) -> list[ModelInfo]:
        return self.catalog.infos()

    def model_ids(self) -> list[str]:
        return self.catalog.ids()

    async def ensure_model(self, model_id: str) -> None:
        if self.catalog_mode is not None:
            await self.catalog_mode.ensure(model_id)
        else:
            self.catalog.get(model_id)

    def search_models(self, query: str = "", limit: int = 50) -> list[dict[str, Any]]:
        if self.catalog_mode is not None:
            return self.catalog_mode.search(query, limit)
        return super().search_models(query, limit)

    async def _acquire(self, model_id: str) -> ServedModel:
        """The model, loaded (catalog mode) and counted as busy until `_release`."""
        for _ in range(3):  # an unload may slip between a load and this request's turn
            await self.ensure_model(model_id)
            model = self.catalog.models.get(model_id)
            limit = self.config.engine.max_queue_per_model
            if model is not None and limit and model.inflight >= limit:
                self.metrics.requests.labels(model_id, "rejected").inc()
                raise OverloadedError(
                    f"model '{model_id}' has {model.inflight} requests in flight or waiting, "
                    f"its limit ([engine] max_queue_per_model = {limit}); retry shortly",
                    retry_after=1.0,
                )
            if model is not None:
                model.inflight += 1
                model.requests += 1
                return model
        raise InferenceError(f"model '{model_id}' was unloaded while loading; retry", status=503)

    def get_model(self, model_id: str) -> dict[str, Any]:
        return self.catalog.get(model_id).package.rdf

    def check_inputs(self, model_id: str, specs: dict[str, tuple[tuple[int, ...], str]]) -> None:
        self._fits(self.catalog.get(model_id).package, specs)  # tileable shapes are accepted

    def timeout_for(self, model_id: str, timeout: float | None = None) -> float:
        """The deadline of one request: the caller's, capped by the model's (or the engine's)
        limit."""
        model = self.catalog.models.get(model_id)
        limit = (model.entry.timeout if model and model.entry.timeout else None) or (
            self.config.engine.request_timeout
        )
        return min(timeout, limit) if timeout and timeout > 0 else limit

    def would_time_out(self, model_id: str, timeout: float | None) -> bool:
        if not timeout or timeout <= 0 or model_id not in self.catalog.models:
            return False
        return self.router.hopeless(
            f"/v2/models/{model_id}/infer", self.timeout_for(model_id, timeout)
        )

    # ---------------------------------------------------------------- inference
    async def infer(
        self,
        model_id: str,
        inputs: dict[str, np.ndarray] | list[np.ndarray],
        *,
        timeout: float | None = None,
    ) -> dict[str, np.ndarray]:
        from .modelpkg import validate_inputs

        model = await self._acquire(model_id)
        pkg = model.package
        started = time.perf_counter()
        status = "ok"
        try:
            if isinstance(inputs, (list, tuple)):
                if len(inputs) != len(pkg.inputs):
                    raise InvalidInputError(
                        f"model '{model_id}' takes {len(pkg.inputs)} input(s) "
                        f"({', '.join(t.id for t in pkg.inputs)}), got {len(inputs)}"
                    )
                inputs = {t.id: np.asarray(a) for t, a in zip(pkg.inputs, inputs, strict=True)}
            else:
                inputs = {k: np.asarray(v) for k, v in inputs.items()}
            specs = {k: (tuple(a.shape), a.dtype.name) for k, a in inputs.items()}
            if not self._fits(pkg, specs):
                return await self._tiled(model_id, inputs, timeout)
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
            model.inflight -= 1
            self.metrics.observe(model_id, status, time.perf_counter() - started)

    async def infer_raw(
        self,
        model_id: str,
        body: bytes,
        headers: dict[str, str],
        *,
        timeout: float | None = None,
        job: Any = None,
    ) -> tuple[int, bytes, dict[str, str]]:
        model = await self._acquire(model_id)
        started = time.perf_counter()
        status = 500
        try:
            tile: list[bool] = []

            def check(specs: dict[str, tuple[tuple[int, ...], str]]) -> None:
                if not self._fits(model.package, specs):
                    tile.append(True)

            request = parse_request(
                model_id, body, headers.get(HEADER_LEN), package=model.package, check=check
            )
            limit = JOB_TIMEOUT if job else self.timeout_for(model_id, timeout or request.timeout)
            if tile:
                from .tiling import decode_inputs, encode_response

                progress = job.progress if job else None
                outputs = await self._tiled(model_id, decode_inputs(request), limit, progress)
                data, out = encode_response(request, model_id, outputs)
                status = 200
                return status, data, out
            parts, upstream_headers = request.build()
            status, data, out = await self.router.request(
                "POST",
                f"/v2/models/{model_id}/infer",
                body=parts,
                headers=upstream_headers,
                timeout=limit,
                verify=lambda st, data, got: check_response(request, st, data, got),
            )
            if status != 200:
                # Triton's error text, rebuilt as our own JSON (a replica's 5xx stays a 5xx)
                data = json.dumps({"error": error_message(data)[:2000]}).encode()
                out = {"Content-Type": "application/json"}
            return status, data, out
        finally:
            model.inflight -= 1
            if status != 200:
                model.errors += 1
            self.metrics.observe(
                model_id, "ok" if status == 200 else "error", time.perf_counter() - started
            )

    def _fits(self, pkg: Any, specs: dict[str, tuple[tuple[int, ...], str]]) -> bool:
        """True when the shapes fit the model as they are (checked once), False when they fit
        once tiled; the strict check's InvalidInputError otherwise."""
        from .modelpkg import validate_input_specs
        from .tiling import tileable

        try:
            validate_input_specs(pkg, specs)
            return True
        except InvalidInputError:
            if tileable(pkg, specs):
                return False
            raise

    async def _tiled(
        self,
        model_id: str,
        inputs: dict[str, np.ndarray],
        timeout: float | None,
        progress: Any = None,
    ) -> dict[str, np.ndarray]:
        """Whole images of any size through bioimageio.core's blocked prediction, each block
        on the replicas (see `tiling`)."""
        from .tiling import Tiler, remote_caller

        model = self.catalog.get(model_id)
        tiler = self._tilers.get(model_id)
        if tiler is None or tiler.pkg is not model.package:
            outputs = [t.id for t in model.package.outputs]
            call = remote_caller(
                asyncio.get_running_loop(),
                self.router.infer,
                model_id,
                outputs,
                self.timeout_for(model_id, timeout),
            )
            width = lambda: 2 * max(1, self.router.ready_count())  # noqa: E731
            tiler = await asyncio.to_thread(Tiler, model.package, call, width)
            self._tilers[model_id] = tiler
        started, before = time.perf_counter(), tiler.blocks_done
        outputs = await asyncio.to_thread(tiler.predict, inputs, progress)
        shapes = ", ".join("x".join(map(str, a.shape)) for a in inputs.values())
        log.info(
            "model %s: %s tiled into %d block(s) in %.2f s",
            model_id, shapes, tiler.blocks_done - before, time.perf_counter() - started,
        )  # fmt: skip
        return outputs

    async def triton_get(
        self, model_id: str, what: str = "metadata", *, version: int | None = None
    ) -> tuple[int, bytes]:
        await self.ensure_model(model_id)
        if what not in TRITON_GETS:
            raise InferenceError(f"unknown model endpoint {what[:20]!r}", status=404)
        if version is not None and not 0 <= int(version) < 10**9:
            raise InferenceError("model version must be a non-negative number", status=400)
        path = f"/v2/models/{model_id}"
        if version is not None:
            path += f"/versions/{int(version)}"
        status, data, _ = await self.router.request("GET", path + TRITON_GETS[what], timeout=30)
        if status >= 400:
            data = json.dumps({"error": error_message(data)[:2000]}).encode()
        return status, data

    async def test_model(self, model_id: str) -> dict[str, Any]:
        await self.ensure_model(model_id)
        served = self.catalog.get(model_id)
        pkg, weight_format = served.package, served.built.weight_format
        inputs = {tid: np.load(path) for tid, path in pkg.test_inputs.items()}
        started = time.perf_counter()
        try:
            outputs = await self.infer(model_id, inputs)
        except BioEngineError as exc:
            return {
                "model_id": model_id,
                "weight_format": weight_format,
                "passed": False,
                "error": str(exc),
            }
        report: dict[str, Any] = {
            "model_id": model_id,
            "weight_format": weight_format,
            "passed": True,
            "outputs": {},
            "execution_time": time.perf_counter() - started,
        }
        for tid, path in pkg.test_outputs.items():
            report["outputs"][tid] = _compare(
                outputs.get(tid), np.load(path), pkg, tid, weight_format
            )
            report["passed"] = report["passed"] and report["outputs"][tid].get("passed", False)
        return report

    async def sample_inputs(self, model_id: str) -> dict[str, np.ndarray]:
        await self.ensure_model(model_id)
        pkg = self.catalog.get(model_id).package
        return {tid: np.load(path, allow_pickle=False) for tid, path in pkg.test_inputs.items()}

    # ---------------------------------------------------------------- jobs
    async def submit_job(self, model_id: str, body: bytes, headers: dict[str, str]) -> dict:
        await self.ensure_model(model_id)
        job = self.jobs.submit(
            model_id, lambda job: self.infer_raw(model_id, body, headers, job=job)
        )
        return job.info()

    def job(self, job_id: str) -> dict[str, Any]:
        return self.jobs.get(job_id).info()

    def job_result(self, job_id: str) -> tuple[int, bytes, dict[str, str]]:
        job = self.jobs.get(job_id)
        if job.answer is None:
            why = job.error or f"the job is {job.state}"
            raise InferenceError(f"job {job_id} has no result: {why}", status=409)
        return job.answer

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        return self.jobs.cancel(job_id).info()

    # ---------------------------------------------------------------- state
    def ready_replicas(self) -> int:
        return self.router.ready_count()

    def metrics_text(self) -> bytes:
        self.metrics.replicas_target.set(self.supervisor.target)
        return self.metrics.render()

    def status(self) -> dict[str, Any]:
        return {
            "deployment": self.config.engine.name,
            "executor": self.config.executor.settings.kind,
            "storage": {
                "kind": self.config.storage.settings.kind,
                "uri": self.catalog.storage.location().uri,
            },
            "target_replicas": self.supervisor.target,
            "ready_replicas": self.router.ready_count(),
            "replicas": self.supervisor.rows(),
            "models": self.catalog.rows(),
            **({"catalog": self.catalog_mode.rows()} if self.catalog_mode else {}),
            **({"autoscale": self._autoscale_status()} if self.supervisor.autoscaler else {}),
            "gateways": self.gateway_info(),
            "uptime_s": time.time() - self.started_at,
        }

    def _autoscale_status(self) -> dict[str, Any]:
        """The autoscaler's status with each decision's time as wall-clock seconds (`at`)."""
        assert self.supervisor.autoscaler is not None
        data = self.supervisor.autoscaler.status()
        offset = time.time() - time.monotonic()
        for d in data.get("decisions", []):
            d["at"] = d["at"] + offset
        return data

    # ---------------------------------------------------------------- admin
    async def load_model(self, ref: str, *, model_id: str | None = None) -> str:
        served = await asyncio.to_thread(self.catalog.prepare, ModelEntry(source=ref, id=model_id))
        self.catalog.add(served, replace=True)
        await self.supervisor.broadcast(served.id, "load")
        await self.supervisor.respec()
        return served.id

    async def unload_model(self, model_id: str) -> None:
        self.catalog.get(model_id)
        await self.supervisor.broadcast(model_id, "unload")
        self.catalog.remove(model_id)
        await self.supervisor.respec()

    async def scale(self, replicas: int) -> None:
        await self.supervisor.scale(replicas)


def _compare(
    got: np.ndarray | None, expected: np.ndarray, package: Any, output_id: str, weight_format: str
) -> dict[str, Any]:
    """One output of a model test against its expected value, judged by the package's own
    reproducibility tolerance for this output and weight format (`tolerance.compare`)."""
    from .tolerance import compare, tolerance_for

    return compare(got, expected, tolerance_for(package, output_id, weight_format))


__all__ = ["TRITON_GETS", "EngineService"]
