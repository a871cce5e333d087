"""The autoscaler policy on a simulated clock: a request trace against simulated replicas.

No real replica runs: a replica becomes ready `cold_start` seconds after it is started, serves
`concurrency` requests at a time for `service_time` seconds each (exponentially distributed,
seeded, unless `exponential=False`), and requests queue (first come, first served) while every
ready replica is busy. The policy is asked every `tick` seconds (the supervisor's
`health_interval`) and at once when a request arrives while it keeps no replica (the wake-up
that scaling from zero relies on). A replica picked for removal takes no new requests and
stops when its requests are done; one still starting is cancelled.

    report = simulate(arrivals, AutoscaleSettings(enabled=True, min_replicas=0), SimSettings())
    report.replica_hours, report.cold_waits, report.decisions
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..autoscale import Autoscaler, AutoscaleSettings, Decision, Observation

READY, DONE, EXPIRE, ARRIVE, TICK = range(5)  # event kinds, in the order ties are handled


@dataclass
class SimSettings:
    """How the simulated replicas and requests behave."""

    cold_start: float = 30.0
    """Seconds from starting a replica to its first answer (Triton start, model load, queue)."""
    service_time: float = 1.0
    """Mean seconds a replica spends on one request."""
    concurrency: int = 1
    """Requests one replica serves at once (Triton instances / batching)."""
    tick: float = 2.0
    """Seconds between the policy's samples (the supervisor's health_interval)."""
    request_timeout: float = 60.0
    """A request waiting this long for a busy replica fails (one that arrived when no replica
    was ready waits up to the policy's cold_start_timeout instead)."""
    wait_bound: float = 10.0
    """Report the requests that waited longer than this."""
    exponential: bool = True
    """Service times drawn from an exponential distribution (False: always service_time)."""
    seed: int = 0
    rate_window: float = 60.0
    """Seconds over which the request rate given to the policy is counted."""


@dataclass
class SimReport:
    """What a simulated run cost and what its requests saw."""

    duration: float
    requests: int = 0
    served: int = 0
    failed: int = 0
    unfinished: int = 0
    replica_seconds: float = 0.0
    waits: list[float] = field(default_factory=list)
    """Queue time of every request that was served or failed (failed ones: their limit)."""
    cold_waits: list[float] = field(default_factory=list)
    """The same, for requests that arrived while no replica was ready (waited for a cold
    start)."""
    over_bound: int = 0
    decisions: list[Decision] = field(default_factory=list)
    hourly: list[tuple[int, int, int]] = field(default_factory=list)
    """(hour, most replicas alive in it, requests that arrived in it)."""

    @property
    def replica_hours(self) -> float:
        """Replica time paid for, from each start (cold start included) to its stop."""
        return self.replica_seconds / 3600

    def always_on_hours(self, n: int) -> float:
        """Replica-hours of keeping `n` replicas for the whole run."""
        return n * self.duration / 3600

    def saving(self, n: int) -> float:
        """Fraction of `always_on_hours(n)` not paid for."""
        full = self.always_on_hours(n)
        return 1 - self.replica_hours / full if full else 0.0

    def summary(self, always_on: int) -> dict[str, Any]:
        """The numbers as one flat dict (for a table or JSON)."""
        return {
            "replica_hours": round(self.replica_hours, 2),
            "always_on_hours": round(self.always_on_hours(always_on), 2),
            "saving": round(self.saving(always_on), 3),
            "requests": self.requests,
            "served": self.served,
            "failed": self.failed,
            "cold_waited": len(self.cold_waits),
            "cold_wait_p50": percentile(self.cold_waits, 50),
            "cold_wait_p99": percentile(self.cold_waits, 99),
            "cold_wait_max": max(self.cold_waits, default=0.0),
            "wait_p99": percentile(self.waits, 99),
            "over_bound": self.over_bound,
            "decisions": len(self.decisions),
        }


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (0.0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def poisson(
    rate: Callable[[float], float], start: float, end: float, peak: float, rng: random.Random
) -> list[float]:
    """Arrival times of a Poisson process with time-varying `rate` (requests/s, never above
    `peak`) between start and end, by thinning."""
    times, t = [], start
    while True:
        t += rng.expovariate(peak)
        if t >= end:
            return times
        if rng.random() * peak < rate(t):
            times.append(t)


@dataclass
class _Replica:
    index: int
    started: float
    ready: bool = False
    busy: int = 0
    draining: bool = False
    gone: bool = False


class _Run:
    def __init__(
        self, arrivals: Sequence[float], policy: Autoscaler, sim: SimSettings, duration: float
    ) -> None:
        self.arrivals, self.policy, self.sim = arrivals, policy, sim
        self.rng = random.Random(sim.seed)
        self.report = SimReport(duration=duration, requests=len(arrivals))
        self.events: list[tuple[float, int, int, int]] = []
        self.order = 0
        self.replicas: list[_Replica] = []
        self.queue: deque[int] = deque()
        self.started = [math.nan] * len(arrivals)  # when each request left the queue
        self.cold = [False] * len(arrivals)
        self.done = [False] * len(arrivals)  # served or failed
        self.waiting = 0
        self.recent: deque[float] = deque()
        self.last_request: float | None = None
        self.hour_max: dict[int, int] = {}

    def push(self, t: float, kind: int, ref: int) -> None:
        self.order += 1
        heapq.heappush(self.events, (t, kind, self.order, ref))

    # ---------------------------------------------------------------- replicas
    def alive(self) -> list[_Replica]:
        return [r for r in self.replicas if not r.gone and not r.draining]

    def start(self, now: float) -> None:
        rep = _Replica(len(self.replicas), started=now)
        self.replicas.append(rep)
        self.push(now + self.sim.cold_start, READY, rep.index)

    def stop(self, rep: _Replica, now: float) -> None:
        rep.gone = True
        self.report.replica_seconds += now - rep.started

    def apply(self, target: int, now: float) -> None:
        alive = self.alive()
        for _ in range(target - len(alive)):
            self.start(now)
        # remove the ones starting first (newest first), then idle, then the least busy
        for rep in sorted(alive, key=lambda r: (r.ready, r.busy, -r.started))[
            : max(0, len(alive) - target)
        ]:
            rep.draining = True
            if rep.busy == 0:
                self.stop(rep, now)
        self.note_count(now)

    def note_count(self, now: float) -> None:
        hour = int(now // 3600)
        self.hour_max[hour] = max(self.hour_max.get(hour, 0), len(self.alive()))

    # ---------------------------------------------------------------- requests
    def dispatch(self, now: float) -> None:
        free = [r for r in self.replicas if r.ready and not r.gone and not r.draining]
        while self.queue and free:
            rep = min(free, key=lambda r: r.busy)
            if rep.busy >= self.sim.concurrency:
                return
            i = self.queue.popleft()
            if self.done[i]:
                continue  # expired while queued
            self.waiting -= 1
            self.started[i] = now
            self.done[i] = True
            wait = now - self.arrivals[i]
            self.record(i, wait)
            self.report.served += 1
            rep.busy += 1
            st = self.sim.service_time
            took = self.rng.expovariate(1 / st) if self.sim.exponential else st
            self.push(now + took, DONE, rep.index)

    def record(self, i: int, wait: float) -> None:
        self.report.waits.append(wait)
        if self.cold[i]:
            self.report.cold_waits.append(wait)
        if wait > self.sim.wait_bound:
            self.report.over_bound += 1

    def observe(self, now: float) -> Observation:
        while self.recent and self.recent[0] <= now - self.sim.rate_window:
            self.recent.popleft()
        live = [r for r in self.replicas if not r.gone]
        return Observation(
            ready=sum(1 for r in live if r.ready and not r.draining),
            starting=sum(1 for r in live if not r.ready and not r.draining),
            inflight=sum(r.busy for r in live),
            waiting=self.waiting,
            rate=len(self.recent) / self.sim.rate_window,
            last_request=self.last_request,
        )

    def ask(self, now: float) -> None:
        decision = self.policy.decide(now, self.observe(now))
        if decision is not None:
            self.report.decisions.append(decision)
            self.apply(decision.target, now)

    # ---------------------------------------------------------------- the loop
    def run(self) -> SimReport:
        sim, report = self.sim, self.report
        for _ in range(self.policy.target):
            self.replicas.append(_Replica(len(self.replicas), started=0.0, ready=True))
        self.note_count(0.0)
        for i, t in enumerate(self.arrivals):
            self.push(t, ARRIVE, i)
        self.push(0.0, TICK, 0)
        while self.events and self.events[0][0] <= report.duration:
            now, kind, _, ref = heapq.heappop(self.events)
            if kind == TICK:
                self.ask(now)
                self.note_count(now)
                self.push(now + sim.tick, TICK, 0)
            elif kind == ARRIVE:
                self.arrive(ref, now)
            elif kind == READY:
                rep = self.replicas[ref]
                if not rep.gone and not rep.draining:
                    rep.ready = True
                    self.dispatch(now)
            elif kind == DONE:
                rep = self.replicas[ref]
                rep.busy -= 1
                if rep.draining and rep.busy == 0 and not rep.gone:
                    self.stop(rep, now)
                self.dispatch(now)
            elif kind == EXPIRE and not self.done[ref]:
                self.done[ref] = True
                self.waiting -= 1
                report.failed += 1
                self.record(ref, now - self.arrivals[ref])
        for rep in self.replicas:
            if not rep.gone:
                self.stop(rep, report.duration)
        report.unfinished = report.requests - report.served - report.failed
        counts: dict[int, int] = {}
        for t in self.arrivals:
            counts[int(t // 3600)] = counts.get(int(t // 3600), 0) + 1
        hours = range(math.ceil(report.duration / 3600))
        report.hourly = [(h, self.hour_max.get(h, 0), counts.get(h, 0)) for h in hours]
        return report

    def arrive(self, i: int, now: float) -> None:
        self.last_request = now
        self.recent.append(now)
        self.cold[i] = not any(r.ready and not r.gone and not r.draining for r in self.replicas)
        self.queue.append(i)
        self.waiting += 1
        limit = self.policy.settings.cold_start_timeout if self.cold[i] else None
        self.push(now + (limit or self.sim.request_timeout), EXPIRE, i)
        self.dispatch(now)
        if self.policy.target == 0:
            self.ask(now)  # the wake-up: a request waits and no replica is kept


def simulate(
    arrivals: Sequence[float],
    settings: AutoscaleSettings,
    sim: SimSettings | None = None,
    *,
    initial: int | None = None,
    duration: float | None = None,
) -> SimReport:
    """Run the policy of `settings` over sorted arrival times (seconds from 0) until
    `duration` (default: the last arrival plus a minute). `initial` replicas (default
    min_replicas) are ready at 0."""
    arrivals = sorted(arrivals)
    end = duration if duration is not None else (arrivals[-1] + 60 if arrivals else 60.0)
    policy = Autoscaler(settings, initial=initial)
    return _Run(arrivals, policy, sim or SimSettings(), end).run()


__all__ = ["SimReport", "SimSettings", "percentile", "poisson", "simulate"]
