"""The replica supervisor: keeps the configured number of healthy replicas and routes to them.

It starts, adopts, refreshes, replaces, succeeds and scales replicas through the executor, and
tells the router which replicas are ready. How much of that it does itself depends on the
executor: with a self-managed executor (local processes, SLURM jobs) the supervisor starts and
replaces each replica; with a platform-managed one (a Kubernetes Deployment) the platform keeps
replicas alive and the supervisor only sets the count and follows what runs. The difference is
expressed once, as two strategies.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp

from .autoscale import Autoscaler, AutoscaleSettings, Decision, Observation
from .config import EngineSettings
from .contracts import Executor, ReplicaSpec, ReplicaState, ReplicaStatus
from .errors import BioEngineError, ExecutorError
from .router import Router
from .strategies import PlatformManaged, SelfManaged, Strategy

log = logging.getLogger("bioengine.engine")


@dataclass
class Replica:
    """The supervisor's view of one replica."""

    status: ReplicaStatus
    routed: bool = False
    successor: str | None = None  # id of the replica started to take over before expiry
    retiring: bool = False
    adopted: bool = False
    failed_since: float | None = None
    models: set[str] | None = None  # the models its spec named when it started (None: unknown)


class ReplicaSupervisor:
    """Keeps `target` replicas ready; the strategy says what the executor leaves to it."""

    def __init__(
        self,
        *,
        executor: Executor,
        router: Router,
        settings: EngineSettings,
        spec: Callable[[], ReplicaSpec],
        model_ids: Callable[[], list[str]],
        hook: Any,
        say: Callable[[str], None],
        on_ready_count: Callable[[int], None],
        autoscale: AutoscaleSettings | None = None,
        on_decision: Callable[[Decision], None] | None = None,
    ) -> None:
        self.executor = executor
        self.router = router
        self.settings = settings
        self.spec = spec
        self.model_ids = model_ids
        self.hook = hook
        self.say = say
        self.on_ready_count = on_ready_count
        self.replicas: dict[str, Replica] = {}
        self.loading = 0  # model loads in flight: Triton answers 'not ready' while one loads
        self.loaded_at = 0.0  # when the last one ended (a health check may have started before)
        self.target = settings.replicas
        self.strategy: Strategy = (
            PlatformManaged(self) if executor.manages_replicas else SelfManaged(self)
        )
        router.on_replica_error.append(self._on_replica_error)
        router.why_none = self._why_none
        self.on_decision = on_decision
        self._wake = asyncio.Event()
        self._queue_totals: dict[str, tuple[int, int]] = {}  # replica -> Triton queue ns, count
        self.autoscaler: Autoscaler | None = None
        if autoscale is not None and autoscale.enabled:
            self.autoscaler = Autoscaler(autoscale, initial=settings.replicas)
            self.target = self.autoscaler.target
            # a request that finds no replica waits for a cold start, not just a restart
            router.wait_for_replica = max(router.wait_for_replica, autoscale.cold_start_timeout)
            router.on_wait.append(self._wake.set)

    # ---------------------------------------------------------------- life cycle
    async def start(self) -> None:
        """Adopt replicas of an earlier run or start new ones; return without waiting."""
        await self.strategy.adopt_or_start()

    async def run(self, stopping: asyncio.Event) -> None:
        """Supervise until `stopping` is set; survive any backend hiccup."""
        while not stopping.is_set():
            try:
                await self.supervise_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("supervisor iteration failed")
            self._wake.clear()
            waits = [asyncio.ensure_future(e.wait()) for e in (stopping, self._wake)]
            try:
                await asyncio.wait(waits, timeout=self.settings.health_interval,
                                   return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            finally:
                for w in waits:
                    w.cancel()

    async def supervise_once(self) -> None:
        """One round: refresh states, let the autoscaler decide, then replace, succeed or
        scale as the strategy does."""
        await self.strategy.refresh()
        if self.autoscaler is not None:
            await self._autoscale()
        await self.strategy.maintain()

    async def _autoscale(self) -> None:
        """Ask the policy with what the router and the replicas show now; apply its decision."""
        assert self.autoscaler is not None
        starting = sum(1 for r in self.replicas.values() if r.status.state.alive and not r.routed)
        queue = None
        if self.autoscaler.settings.target_queue_seconds is not None:
            queue = await self._triton_queue_seconds()
        obs = Observation(
            ready=self.router.ready_count(),
            starting=starting,
            inflight=sum(r.outstanding for r in self.router.routes.values()),
            waiting=self.router.waiting,
            last_request=self.router.last_request,
            queue_seconds=queue,
        )
        decision = self.autoscaler.decide(time.monotonic(), obs)
        if decision is not None:
            self._apply(decision)
            if self.executor.manages_replicas:  # self-managed: maintain() follows the target
                await self.strategy.scale()

    async def _triton_queue_seconds(self) -> float | None:
        """Average time the requests answered since the last round spent in Triton's queues
        (from each ready replica's `/v2/models/stats`); None when none was answered."""
        session = await self.router.session()
        queued_ns = answered = 0
        for route in list(self.router.routes.values()):
            try:
                async with session.get(f"{route.url}/v2/models/stats", timeout=2) as resp:
                    stats = await resp.json() if resp.status == 200 else {}
            except (OSError, ValueError, TimeoutError, aiohttp.ClientError):
                continue
            ns = count = 0
            for model in stats.get("model_stats", []):
                queue = model.get("inference_stats", {}).get("queue", {})
                ns += int(queue.get("ns", 0))
                count += int(queue.get("count", 0))
            last_ns, last_count = self._queue_totals.get(route.replica_id, (ns, count))
            self._queue_totals[route.replica_id] = (ns, count)
            if count >= last_count:
                queued_ns += ns - last_ns
                answered += count - last_count
        return queued_ns / answered / 1e9 if answered else None

    def _apply(self, decision: Decision) -> None:
        self.target = decision.target
        self.say(f"autoscale: {decision.reason}")
        if self.on_decision is not None:
            self.on_decision(decision)

    async def stop_all(self) -> None:
        """Stop every replica of this deployment (drained first)."""
        await self.strategy.stop_all()

    async def scale(self, replicas: int) -> None:
        """Change the target number of replicas."""
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        if self.autoscaler is not None:
            self._apply(self.autoscaler.manual(time.monotonic(), replicas))
        else:
            self.target = replicas
        await self.strategy.scale()

    async def respec(self) -> None:
        """The model list changed: let a platform start replicas with the new spec."""
        await self.strategy.respec()

    # ---------------------------------------------------------------- readiness
    async def wait_ready(self, needed: int) -> None:
        """Refresh until `needed` replicas are routed; show progress; fail on timeout."""
        deadline = time.monotonic() + self.settings.ready_timeout
        last_line = ""
        while True:
            await self.strategy.refresh()
            ready = self.router.ready_count()
            if ready >= needed:
                rest = "; the rest continue starting" if ready < self.target else ""
                self.say(f"{ready}/{self.target} replica(s) ready{rest}")
                return
            states = self._states()
            line = f"waiting for replicas: {ready}/{self.target} ready; {states}"
            if line != last_line:
                self.say(line)
                last_line = line
            hopeless = [(rid, r) for rid, r in self.replicas.items() if r.status.unsatisfiable]
            if hopeless and ready == 0:
                rid, rep = hopeless[0]
                raise ExecutorError(
                    f"replica {rid} can never start: {rep.status.message or 'unsatisfiable'}"
                )
            if time.monotonic() > deadline:
                raise ExecutorError(
                    f"replicas not ready after {self.settings.ready_timeout:.0f} s "
                    f"({states}){await self._log_tails()}"
                )
            await asyncio.sleep(0.5)

    def _why_none(self) -> str:
        """Why no replica is ready, for a waiting caller: each replica's state and message."""
        if not self.replicas:
            return f"no replica is running; target {self.target}"
        return "; ".join(
            f"replica {rid} {r.status.state.value}"
            + (f": {r.status.message.splitlines()[0][:200]}" if r.status.message else "")
            for rid, r in sorted(self.replicas.items())
        )[:1000]

    def _states(self) -> str:
        return ", ".join(
            f"{rid}: {r.status.state.value}"
            + (f" ({r.status.message})" if r.status.message else "")
            for rid, r in sorted(self.replicas.items())
        )

    async def _log_tails(self) -> str:
        logs = ""
        for rid in list(self.replicas)[:2]:
            try:
                tail = await asyncio.to_thread(self.executor.logs, rid, tail=20)
                logs += f"\n--- last log lines of {rid} ---\n{tail}"
            except BioEngineError:
                pass
        return logs

    # ---------------------------------------------------------------- shared steps
    async def apply(self, rep: Replica, status: ReplicaStatus) -> None:
        """Record a replica's new status; route it when ready, unroute it when not."""
        previous = rep.status.state
        recent = time.monotonic() - self.loaded_at < 2 * self.settings.health_interval + 1
        if (self.loading or recent) and rep.routed and status.state == ReplicaState.STARTING:
            # Triton's strict readiness says 'not ready' while a model loads; the replica
            # still serves its other models, so it stays routed.
            return
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
            self.hook.bioengine_replica_state_changed(replica=status, previous=previous.value)
            if status.state in (ReplicaState.READY, ReplicaState.FAILED, ReplicaState.UNKNOWN):
                why = f": {status.message.splitlines()[0]}" if status.message else ""
                where = f" at {status.url}" if status.state == ReplicaState.READY else why
                self.say(f"replica {status.replica_id} is {status.state.value}{where}")
        if status.state == ReplicaState.READY and status.url and not rep.routed:
            if rep.adopted:
                await self.ensure_loaded(status.url)
            elif rep.models is not None and (missing := set(self.model_ids()) - rep.models):
                # models loaded on demand while this replica was starting
                await self.ensure_loaded(status.url, only=missing)
            self.router.add(status.replica_id, status.url)
            rep.routed = True
        elif status.state != ReplicaState.READY and rep.routed:
            self.router.drain(status.replica_id)
            rep.routed = False
        self.on_ready_count(self.router.ready_count())

    def track(self, status: ReplicaStatus, *, adopted: bool = False) -> Replica:
        """Start following a replica (a new or an adopted one); the state hook fires for it."""
        rep = Replica(status, adopted=adopted)
        self.replicas[status.replica_id] = rep
        self.hook.bioengine_replica_state_changed(replica=status, previous=None)
        return rep

    async def start_replica(self, successor_of: str | None = None) -> str:
        """Start one replica (optionally as the successor of another)."""
        spec = self.spec()
        status = await asyncio.to_thread(self.executor.start, spec)
        self.track(status).models = set(spec.models)
        if successor_of and successor_of in self.replicas:
            self.replicas[successor_of].successor = status.replica_id
        why = f" to succeed {successor_of}" if successor_of else ""
        self.say(f"started replica {status.replica_id}{why} ({status.state.value})")
        return status.replica_id

    async def stop_replica(self, replica_id: str, *, reason: str) -> None:
        """Drain a replica (no new requests; in-flight ones finish), then stop it."""
        replica = self.replicas.get(replica_id)
        if replica is not None:
            replica.retiring = True
        self.router.drain(replica_id)
        left = await self.router.wait_idle(replica_id, timeout=self.settings.request_timeout)
        await self.router.release(replica_id)
        drained = "drained" if not left else f"not drained ({left} request(s) still in flight)"
        self.say(f"replica {replica_id} {drained}; stopping it ({reason})")
        try:
            await asyncio.to_thread(self.executor.stop, replica_id, grace=self.settings.stop_grace)
        except BioEngineError as exc:
            log.error("could not stop replica %s: %s", replica_id, exc)
        self.replicas.pop(replica_id, None)

    def _on_replica_error(self, replica_id: str) -> None:
        rep = self.replicas.get(replica_id)
        if rep is not None:
            # no new requests until the next health check says it is still ready
            self.router.drain(replica_id)
            rep.routed = False

    # ---------------------------------------------------------------- admin calls
    async def ensure_loaded(self, url: str, only: set[str] | None = None) -> None:
        """Make a replica load the current version of every model (or of `only` these)."""
        session = await self.router.session()
        for name in sorted(only) if only is not None else self.model_ids():
            async with session.post(f"{url}/v2/repository/models/{name}/load") as resp:
                if resp.status != 200:
                    log.warning(
                        "adopted replica %s could not load %s: %s", url, name, await resp.text()
                    )

    async def broadcast(self, model_id: str, action: str) -> None:
        """`load` or `unload` a model on every routed replica; ExecutorError naming a refusal."""
        if action not in ("load", "unload"):
            raise ValueError(action)
        session = await self.router.session()
        self.loading += 1
        try:
            for route in list(self.router.routes.values()):
                path = f"/v2/repository/models/{model_id}/{action}"
                async with session.post(route.url + path) as resp:
                    if resp.status != 200:
                        raise ExecutorError(f"replica {route.replica_id}: {await resp.text()}")
        finally:
            self.loading -= 1
            self.loaded_at = time.monotonic()

    # ---------------------------------------------------------------- reporting
    def rows(self) -> list[dict[str, Any]]:
        """One status line per replica."""
        rows = []
        for rid, rep in sorted(self.replicas.items()):
            s = rep.status
            route = self.router.routes.get(rid)
            rows.append(
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
        return rows


__all__ = ["Replica", "ReplicaSupervisor"]
