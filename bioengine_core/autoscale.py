"""`[autoscale]`: the autoscaler policy, which decides how many replicas to keep.

The policy is pure: it is given the time and what the engine observes (replicas ready and
starting, requests in flight and waiting, optionally Triton's queue time) and returns a
`Decision` (a target count and a one-line reason) or None. It never reads a clock and never
acts; the supervisor acts on its decisions. The same policy drives `bench/simulate_day.py`
on a simulated clock.

How it decides (every call is one sample):
- *load*: requests in flight plus requests waiting for a replica, averaged over
  `load_window` seconds; the replicas it needs is that load / `target_inflight_per_replica`,
  rounded up (and at least one more than now while Triton's queue time is over
  `target_queue_seconds`).
- *up*: when more replicas are needed in every sample for `scale_up_delay` seconds.
- *down*: when fewer are needed in every sample for `scale_down_delay` seconds, to the most
  needed in that time; never below max(1, min_replicas).
- *cooldown*: no change for `cooldown` seconds after any change (manual ones included).
- *from zero*: with no replica, a request that waits starts replicas at once (no delay).
- *to zero*: with min_replicas = 0, after `idle_to_zero_after` seconds without a request.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Kind = Literal["up", "down", "from_zero", "to_zero", "manual"]
KINDS: tuple[Kind, ...] = ("up", "down", "from_zero", "to_zero", "manual")


class AutoscaleSettings(BaseModel):
    """`[autoscale]`: keep between min_replicas and max_replicas replicas, following the load."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(
        False, description="Follow the load; off: keep [engine] replicas (manual scale only)."
    )
    min_replicas: int = Field(
        1,
        ge=0,
        le=64,
        description="Fewest replicas kept (0: none while idle, see "
        "idle_to_zero_after; the first request then waits for a cold start).",
    )
    max_replicas: int = Field(4, ge=1, le=64, description="Most replicas started.")
    target_inflight_per_replica: float = Field(
        4.0,
        gt=0,
        le=10000,
        description="Requests in flight (sent and not answered, or waiting for a replica) "
        "per replica that the policy aims at; above it replicas are added, below it removed.",
    )
    target_queue_seconds: float | None = Field(
        None,
        gt=0,
        description="Also add a replica while Triton's queue time per request (from its "
        "metrics) stays above this many seconds (unset: requests in flight only).",
    )
    load_window: float = Field(
        20.0, gt=0, le=3600, description="Seconds over which the load is averaged."
    )
    scale_up_delay: float = Field(
        30.0,
        ge=0,
        le=86400,
        description="Seconds the load must stay above target before replicas are added.",
    )
    scale_down_delay: float = Field(
        300.0,
        ge=0,
        le=86400,
        description="Seconds the load must stay below target before replicas are removed.",
    )
    cooldown: float = Field(
        60.0,
        ge=0,
        le=86400,
        description="Seconds after any change (manual ones included) "
        "before the next one (scaling from zero is never held back).",
    )
    idle_to_zero_after: float = Field(
        900.0,
        gt=0,
        le=7 * 86400,
        description="With min_replicas = 0: seconds without a "
        "request (or a change) before every replica is stopped.",
    )
    cold_start_timeout: float = Field(
        600.0,
        gt=0,
        le=86400,
        description="Seconds a request waits for a replica to start "
        "when none is ready, before it fails with the reason.",
    )

    @model_validator(mode="after")
    def _limits(self) -> AutoscaleSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) is more than max_replicas "
                f"({self.max_replicas}); make min_replicas <= max_replicas"
            )
        return self


@dataclass(frozen=True)
class Observation:
    """What the engine sees at one moment (counts over all replicas of the deployment)."""

    ready: int
    """Replicas accepting requests."""
    starting: int = 0
    """Replicas started and not ready yet."""
    inflight: float = 0
    """Requests sent to a replica and not answered yet."""
    waiting: int = 0
    """Requests waiting for a ready replica (with none ready: waiting for a cold start)."""
    rate: float = 0.0
    """Requests per second recently received (0: none)."""
    queue_seconds: float | None = None
    """Average time a request spent in Triton's queue recently (None: not measured)."""
    last_request: float | None = None
    """When the last request arrived, on the clock `decide` is given (None: unknown)."""


@dataclass(frozen=True)
class Decision:
    """A new replica count and why, in one line an operator can read."""

    target: int
    reason: str
    previous: int = 0
    at: float = 0.0
    kind: Kind = "up"


def _n_replicas(n: int) -> str:
    """'1 replica', '3 replicas'."""
    return f"{n} replica" + ("" if n == 1 else "s")


class Autoscaler:
    """The policy: `decide(now, observation)` returns a Decision or None; `target` is the count
    the supervisor should keep. Deterministic given the times it is called with."""

    HISTORY = 20

    def __init__(self, settings: AutoscaleSettings, initial: int | None = None) -> None:
        self.settings = settings
        start = settings.min_replicas if initial is None else initial
        self.target = self.clamp(start)[0]
        self.history: deque[Decision] = deque(maxlen=self.HISTORY)
        self.counts: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.load = 0.0  # the averaged load of the last sample
        self._samples: deque[tuple[float, float, float | None]] = deque()
        self._sum = 0.0
        self._changed_at: float | None = None
        self._active_at: float | None = None  # last request, change or first sample
        self._above_since: float | None = None
        self._below_since: float | None = None
        self._most_needed = 0

    # ------------------------------------------------------------------ limits
    @property
    def floor(self) -> int:
        """The fewest replicas the load-following part keeps (zero only through idling)."""
        return max(1, self.settings.min_replicas)

    def clamp(self, n: int) -> tuple[int, str]:
        """`n` bounded by min_replicas and max_replicas, and what was done to it."""
        low, high = self.settings.min_replicas, self.settings.max_replicas
        if n < low:
            return low, f"{n} is below min_replicas {low}: using {low}"
        if n > high:
            return high, f"{n} is above max_replicas {high}: using {high}"
        return n, f"{_n_replicas(n)} (within min_replicas {low} and max_replicas {high})"

    def manual(self, now: float, n: int) -> Decision:
        """An operator's `scale n`: bounded like the policy's own decisions; starts the cooldown
        and the idle timer."""
        target, why = self.clamp(n)
        extra = "" if target == n else f" ({why})"
        return self._decide(
            now, target, f"{self.target} -> {_n_replicas(target)}: manual{extra}", "manual"
        )

    # ------------------------------------------------------------------ the policy
    def decide(self, now: float, obs: Observation) -> Decision | None:
        """Take one sample; return a change of the target count, or None to keep it."""
        s = self.settings
        demand = max(0.0, float(obs.inflight)) + max(0, obs.waiting)
        self._sample(now, demand, obs.queue_seconds)
        if self._active_at is None:
            self._active_at = now
        if obs.last_request is not None:
            self._active_at = max(self._active_at, obs.last_request)
        if demand > 0 or obs.rate > 0:
            self._active_at = now

        if self.target == 0:
            if obs.waiting > 0 or demand > 0:
                want = self.clamp(max(1, math.ceil(demand / s.target_inflight_per_replica)))[0]
                held = "request" if obs.waiting == 1 else "requests"
                return self._decide(
                    now,
                    want,
                    f"0 -> {_n_replicas(want)}: {obs.waiting} {held} waiting and no replica "
                    "(scale from zero)",
                    "from_zero",
                )
            return None
        cooling = self._changed_at is not None and now - self._changed_at < s.cooldown
        idle = now - self._active_at
        if s.min_replicas == 0 and idle >= s.idle_to_zero_after and not cooling:
            return self._decide(
                now,
                0,
                f"{self.target} -> 0 replicas: no request for {idle:.0f} s "
                f"(idle_to_zero_after {s.idle_to_zero_after:g} s)",
                "to_zero",
            )

        # the delays run during a cooldown too; a change waits for both
        needed, queued = self._needed()
        if needed > self.target:
            self._below_since = None
            self._above_since = now if self._above_since is None else self._above_since
            held = now - self._above_since
            if held >= s.scale_up_delay and not cooling:
                return self._decide(now, needed, self._why(needed, held, queued), "up")
        elif needed < self.target:
            self._above_since = None
            if self._below_since is None:
                self._below_since, self._most_needed = now, needed
            self._most_needed = max(self._most_needed, needed)
            held = now - self._below_since
            if held >= s.scale_down_delay and not cooling:
                to = self._most_needed
                return self._decide(now, to, self._why(to, held, None), "down")
        else:
            self._above_since = self._below_since = None
        return None

    def _sample(self, now: float, demand: float, queue: float | None) -> None:
        self._samples.append((now, demand, queue))
        self._sum += demand
        while self._samples and self._samples[0][0] <= now - self.settings.load_window:
            self._sum -= self._samples.popleft()[1]
        self.load = max(0.0, self._sum / len(self._samples))

    def _needed(self) -> tuple[int, float | None]:
        """Replicas the averaged load needs (bounded), and the averaged queue time when it
        alone asks for one more."""
        s = self.settings
        needed = math.ceil(round(self.load / s.target_inflight_per_replica, 9))
        queues = [q for _, _, q in self._samples if q is not None]
        queue = sum(queues) / len(queues) if queues else None
        limit = s.target_queue_seconds
        if limit is not None and queue is not None and queue > limit and needed <= self.target:
            return min(self.target + 1, s.max_replicas), queue
        return min(max(needed, self.floor), s.max_replicas), None

    def _why(self, to: int, held: float, queue: float | None) -> str:
        s = self.settings
        per = self.load / max(self.target, 1)
        head = f"{self.target} -> {_n_replicas(to)}: "
        if to > self.target:
            if queue is not None:
                return (
                    head + f"queue time {queue:.2f} s for {held:.0f} s "
                    f"> target {s.target_queue_seconds:g} s"
                )
            return (
                head + f"{per:.1f} requests in flight per replica for {held:.0f} s "
                f"> target {s.target_inflight_per_replica:g}"
            )
        return (
            head + f"below target {s.target_inflight_per_replica:g} in flight per replica "
            f"for {held:.0f} s; at most {_n_replicas(to)} needed in that time (now {per:.1f})"
        )

    def _decide(self, now: float, target: int, reason: str, kind: Kind) -> Decision:
        decision = Decision(target, reason, previous=self.target, at=now, kind=kind)
        self.target = target
        self._changed_at = now
        self._active_at = now  # the idle time counts from the last request or change
        self._above_since = self._below_since = None
        self.history.append(decision)
        self.counts[kind] += 1
        return decision

    # ------------------------------------------------------------------ reporting
    def status(self) -> dict[str, Any]:
        """What `bioengine status` shows: limits, target, load and the recent decisions."""
        s = self.settings
        return {
            "enabled": s.enabled,
            "target": self.target,
            "min_replicas": s.min_replicas,
            "max_replicas": s.max_replicas,
            "load": round(self.load, 3),
            "decisions": [asdict(d) for d in self.history],
        }

    def counters(self) -> dict[str, int]:
        """Decisions taken so far, by kind (for a metrics exporter's counter)."""
        return dict(self.counts)


__all__ = [
    "AutoscaleSettings",
    "Autoscaler",
    "Decision",
    "Observation",
]
