"""How the replica supervisor keeps replicas: itself (self-managed executors) or through a
platform that keeps them alive (platform-managed executors). The one place where the two
differ."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from .contracts import ReplicaState, ReplicaStatus
from .errors import BioEngineError

if TYPE_CHECKING:
    from .supervisor import Replica, ReplicaSupervisor

log = logging.getLogger("bioengine.engine")

UNKNOWN_GRACE = 60.0
"""Seconds a self-managed replica may stay UNKNOWN (controller unreachable) before replacement."""


class Strategy:
    """What the supervisor does itself, depending on who keeps replicas alive."""

    def __init__(self, sup: ReplicaSupervisor) -> None:
        self.sup = sup

    async def adopt_or_start(self) -> None:
        raise NotImplementedError

    async def refresh(self) -> None:
        raise NotImplementedError

    async def maintain(self) -> None:
        raise NotImplementedError

    async def stop_all(self) -> None:
        raise NotImplementedError

    async def scale(self) -> None:
        raise NotImplementedError

    async def respec(self) -> None:
        raise NotImplementedError


class SelfManaged(Strategy):
    """The supervisor starts, replaces and stops each replica (local processes, SLURM jobs)."""

    async def adopt_or_start(self) -> None:
        sup = self.sup
        found = await asyncio.to_thread(sup.executor.list, sup.spec().deployment)
        for status in found:
            sup.track(status, adopted=True)
            sup.say(
                f"adopted running replica {status.replica_id} ({status.state.value}, "
                f"{status.url or 'no endpoint yet'})"
            )
        alive = [r for r in sup.replicas.values() if r.status.state.alive]
        for extra in alive[sup.target :]:
            await sup.stop_replica(extra.status.replica_id, reason="more than configured")
        for _ in range(sup.target - len(alive)):
            await sup.start_replica()

    async def refresh(self) -> None:
        sup = self.sup
        for rid, rep in list(sup.replicas.items()):
            if rep.retiring:
                continue
            try:
                status = await asyncio.to_thread(sup.executor.status, rid)
            except BioEngineError as exc:
                status = ReplicaStatus(
                    rid, ReplicaState.UNKNOWN, url=rep.status.url, message=str(exc)
                )
            await sup.apply(rep, status)

    async def maintain(self) -> None:
        sup = self.sup
        now = time.time()
        for rid, rep in list(sup.replicas.items()):
            if not rep.retiring:
                await self._tend(rid, rep, now)
        active = [
            r
            for r in sup.replicas.values()
            if not r.retiring and r.status.state.alive and not self._is_successor(r)
        ]
        for _ in range(sup.target - len(active)):
            await sup.start_replica()
        for extra in active[sup.target :]:
            await sup.stop_replica(extra.status.replica_id, reason="scaled down")

    async def _tend(self, rid: str, rep: Replica, now: float) -> None:
        """Replace a failed replica, give up on a long-unknown one, hand over before expiry."""
        sup = self.sup
        state = rep.status.state
        if state in (ReplicaState.FAILED, ReplicaState.STOPPED):
            sup.say(f"replica {rid} {state.value}: {rep.status.message or 'ended'}; replacing it")
            await sup.stop_replica(rid, reason=state.value)
            return
        if state == ReplicaState.UNKNOWN:
            rep.failed_since = rep.failed_since or now
            if now - rep.failed_since > UNKNOWN_GRACE:
                await sup.stop_replica(rid, reason=f"unknown for {UNKNOWN_GRACE:.0f} s")
            return
        rep.failed_since = None
        expires = rep.status.expires_at
        if expires and expires - now < sup.settings.successor_lead and rep.successor is None:
            await sup.start_replica(successor_of=rid)
        if rep.successor:
            succ = sup.replicas.get(rep.successor)
            if succ is None:
                rep.successor = None
            elif succ.routed:
                await sup.stop_replica(rid, reason="its successor is ready")

    def _is_successor(self, rep: Replica) -> bool:
        return any(
            r.successor == rep.status.replica_id
            for r in self.sup.replicas.values()
            if r is not rep and r.status.replica_id in self.sup.replicas
        )

    async def stop_all(self) -> None:
        sup = self.sup
        await asyncio.gather(
            *(sup.stop_replica(rid, reason="shutdown") for rid in list(sup.replicas))
        )

    async def scale(self) -> None:
        await self.sup.supervise_once()

    async def respec(self) -> None:
        """New replicas get the current spec when they start; running ones load models live."""


class PlatformManaged(Strategy):
    """The platform keeps replicas alive (a Kubernetes Deployment): set the count, follow it."""

    async def adopt_or_start(self) -> None:
        await self.scale()

    async def refresh(self) -> None:
        sup = self.sup
        try:
            listed = await asyncio.to_thread(sup.executor.list, sup.spec().deployment)
        except BioEngineError as exc:
            # the platform keeps replicas alive; keep routing to the known ones meanwhile
            log.warning("cannot list replicas (%s); keeping current routes", exc)
            return
        seen = set()
        for status in listed:
            seen.add(status.replica_id)
            rep = sup.replicas.get(status.replica_id) or sup.track(status)
            await sup.apply(rep, status)
        for rid in list(sup.replicas):
            if rid not in seen:
                await sup.router.release(rid)
                sup.replicas.pop(rid, None)

    async def maintain(self) -> None:
        """Nothing: the platform replaces failed replicas itself."""

    async def stop_all(self) -> None:
        await asyncio.to_thread(self.sup.executor.scale, self.sup.spec(), 0)

    async def scale(self) -> None:
        await asyncio.to_thread(self.sup.executor.scale, self.sup.spec(), self.sup.target)

    async def respec(self) -> None:
        await self.scale()


__all__ = ["PlatformManaged", "SelfManaged", "Strategy"]
