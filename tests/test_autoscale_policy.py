"""The autoscaler policy (issue 12) on a simulated clock: it follows the load within the limits,
honours its delays and cooldown, scales from and to zero, and says why."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from bioengine_core.autoscale import Autoscaler, AutoscaleSettings, Decision, Observation
from bioengine_core.testing.simclock import SimSettings, percentile, simulate

TICK = 2.0


def policy(**values) -> Autoscaler:
    base = {
        "enabled": True,
        "min_replicas": 1,
        "max_replicas": 4,
        "target_inflight_per_replica": 2,
        "load_window": 10,
        "scale_up_delay": 10,
        "scale_down_delay": 60,
        "cooldown": 20,
    }
    initial = values.pop("initial", None)
    return Autoscaler(AutoscaleSettings(**{**base, **values}), initial=initial)


def drive(
    auto: Autoscaler, start: float, end: float, load, **obs
) -> list[Decision]:  # load(t) -> requests in flight
    """Ask the policy every TICK seconds as the supervisor does; the replicas follow at once."""
    decisions, t = [], start
    while t < end:
        d = auto.decide(t, Observation(ready=auto.target, inflight=load(t), **obs))
        if d is not None:
            decisions.append(d)
        t += TICK
    return decisions


def test_rising_load_grows_toward_max_with_reasons():
    auto = policy()
    decisions = drive(auto, 0, 600, lambda t: t / 30)  # 0 .. 20 requests in flight
    assert decisions and all(d.kind == "up" for d in decisions)
    targets = [d.target for d in decisions]
    assert targets == sorted(targets) and targets[-1] == 4 and auto.target == 4
    for d in decisions:
        assert f"{d.previous} -> {d.target} replica" in d.reason
        assert "requests in flight per replica" in d.reason and "> target 2" in d.reason
        assert "\n" not in d.reason


def test_load_stops_then_shrinks_only_after_the_delay():
    auto = policy(initial=4, cooldown=0)
    drive(auto, 0, 100, lambda t: 8.0)  # exactly what 4 replicas are meant to carry
    assert auto.target == 4
    decisions = drive(auto, 100, 1000, lambda t: 0.0)
    assert decisions and all(d.kind == "down" for d in decisions)
    # the average falls below target within load_window; removal waits scale_down_delay more
    assert decisions[0].at >= 100 + 60
    assert auto.target == 1  # min_replicas
    for d in decisions:
        held = re.search(r"below target 2 in flight per replica for (\d+) s", d.reason)
        assert held and int(held.group(1)) >= 60


def test_a_short_dip_removes_nothing():
    auto = policy(initial=4, cooldown=0)
    load = lambda t: 0.0 if 200 <= t < 240 else 8.0  # noqa: E731
    assert drive(auto, 0, 600, load) == []


def test_cooldown_holds_back_the_next_change():
    auto = policy(cooldown=120, scale_up_delay=0)
    decisions = drive(auto, 0, 1200, lambda t: 3.0 if t < 400 else 20.0)
    ups = [d for d in decisions if d.kind == "up"]
    assert len(ups) >= 2
    for a, b in zip(decisions, decisions[1:], strict=False):
        assert b.at - a.at >= 120


def test_manual_scale_is_clamped_and_starts_a_cooldown():
    auto = policy(min_replicas=1, max_replicas=3, cooldown=100)
    assert auto.clamp(7)[0] == 3 and "max_replicas 3" in auto.clamp(7)[1]
    assert auto.clamp(0)[0] == 1 and "min_replicas 1" in auto.clamp(0)[1]
    assert auto.clamp(2)[0] == 2
    d = auto.manual(50.0, 9)
    assert d.target == 3 == auto.target and d.kind == "manual" and "max_replicas 3" in d.reason
    # no load at all: still kept during the cooldown
    assert drive(auto, 52, 150, lambda t: 0.0) == []


@settings(max_examples=60, deadline=None)
@given(
    low=st.integers(0, 3),
    span=st.integers(0, 4),
    loads=st.lists(st.floats(0, 50), min_size=1, max_size=200),
    waiting=st.lists(st.integers(0, 5), min_size=1, max_size=200),
)
def test_never_outside_the_limits(low, span, loads, waiting):
    auto = policy(
        min_replicas=low, max_replicas=max(1, low + span), scale_up_delay=0, cooldown=0,
        scale_down_delay=0, idle_to_zero_after=5,
    )  # fmt: skip
    high = max(1, low + span)
    for i, load in enumerate(loads):
        w = waiting[i % len(waiting)]
        auto.decide(i * TICK, Observation(ready=auto.target, inflight=load, waiting=w))
        assert low <= auto.target <= high
    assert auto.manual(len(loads) * TICK, 99).target == high
    assert auto.manual(len(loads) * TICK, -5).target == low


def test_a_waiting_request_scales_from_zero_at_once():
    auto = policy(min_replicas=0, initial=0, cooldown=600, scale_up_delay=300)
    assert auto.decide(0.0, Observation(ready=0)) is None  # nothing to do without requests
    d = auto.decide(1.0, Observation(ready=0, waiting=1, last_request=1.0))
    assert d is not None and d.kind == "from_zero" and d.target == 1
    assert "1 request waiting and no replica" in d.reason
    # a crowd waiting starts as many as it needs at target (2 each), up to max
    auto = policy(min_replicas=0, initial=0)
    d = auto.decide(1.0, Observation(ready=0, waiting=7))
    assert d is not None and d.target == 4


def test_idle_to_zero_only_after_the_idle_time():
    auto = policy(min_replicas=0, initial=1, idle_to_zero_after=900)
    drive(auto, 0, 100, lambda t: 1.0)  # requests until 100
    quiet = drive(auto, 100, 2000, lambda t: 0.0, last_request=99.0)
    assert [d.kind for d in quiet] == ["to_zero"]
    assert 99 + 900 <= quiet[0].at <= 99 + 900 + TICK
    assert "no request for 90" in quiet[0].reason and auto.target == 0
    # min_replicas >= 1 never goes to zero
    auto = policy(min_replicas=1, initial=1, idle_to_zero_after=60)
    assert drive(auto, 0, 3000, lambda t: 0.0) == []


def test_a_request_resets_the_idle_timer():
    auto = policy(min_replicas=0, initial=1, idle_to_zero_after=900)
    drive(auto, 0, 800, lambda t: 0.0)
    auto.decide(800.0, Observation(ready=1, rate=0.1, last_request=799.0))
    later = drive(auto, 802, 1600, lambda t: 0.0, last_request=799.0)
    assert later == []  # 1600 - 799 < 900
    assert [d.kind for d in drive(auto, 1600, 1800, lambda t: 0.0)] == ["to_zero"]


def test_queue_time_over_target_adds_a_replica():
    auto = policy(target_queue_seconds=0.5, target_inflight_per_replica=100)
    decisions = drive(auto, 0, 60, lambda t: 1.0, queue_seconds=2.0)
    assert [d.target for d in decisions] == [2, 3, 4]  # one at a time, each after a cooldown
    assert "queue time 2.00 s" in decisions[0].reason and "target 0.5 s" in decisions[0].reason
    assert drive(auto, 60, 400, lambda t: 1.0, queue_seconds=0.1)[-1].target == 1


def test_status_and_counters_show_the_decisions():
    auto = policy(min_replicas=0, initial=0)
    auto.decide(0.0, Observation(ready=0, waiting=1))
    auto.manual(5.0, 3)
    status = auto.status()
    assert status["target"] == 3 and status["min_replicas"] == 0 and status["max_replicas"] == 4
    assert [d["kind"] for d in status["decisions"]] == ["from_zero", "manual"]
    assert all(d["reason"] for d in status["decisions"])
    assert auto.counters() == {"up": 0, "down": 0, "from_zero": 1, "to_zero": 0, "manual": 1}


def test_settings_are_checked_with_clear_messages():
    with pytest.raises(ValidationError, match="min_replicas .3. is more than max_replicas .2."):
        AutoscaleSettings(min_replicas=3, max_replicas=2)
    with pytest.raises(ValidationError, match="Extra inputs"):
        AutoscaleSettings(max_replica=2)
    with pytest.raises(ValidationError):
        AutoscaleSettings(target_inflight_per_replica=0)
    assert AutoscaleSettings().enabled is False
    for name, field in AutoscaleSettings.model_fields.items():
        assert field.description, name


# ------------------------------------------------------------------ the simulator


def test_a_burst_after_idle_waits_for_one_cold_start():
    arrivals = [1000 + i * 0.1 for i in range(5)]
    report = simulate(
        arrivals,
        AutoscaleSettings(enabled=True, min_replicas=0, max_replicas=4, idle_to_zero_after=600),
        SimSettings(cold_start=20, service_time=1.0, exponential=False, concurrency=1),
        duration=3000,
    )
    assert report.served == 5 and report.failed == 0
    assert len(report.cold_waits) == 5  # all arrived while no replica was ready
    # the first waited the cold start; the others also queued behind it (1 s each)
    assert report.cold_waits[0] == pytest.approx(20.0)
    assert max(report.cold_waits) == pytest.approx(20.0 + 4 * 1.0 - 0.4)
    assert percentile(report.cold_waits, 50) == pytest.approx(20.0 + 2 * 1.0 - 0.2)
    assert [d.kind for d in report.decisions] == ["from_zero", "to_zero"]
    # paid: from 1000 until idle_to_zero_after past the last answer, not the 3000 s
    assert 600 / 3600 < report.replica_hours < 700 / 3600
    assert report.saving(1) > 0.75


def test_always_on_pays_for_the_whole_day_and_never_cold_starts():
    arrivals = [3600.0 * h + 5 for h in range(24)]
    always = simulate(arrivals, AutoscaleSettings(min_replicas=2, max_replicas=2), duration=86400)
    assert always.replica_hours == pytest.approx(48.0)
    assert always.cold_waits == [] and always.decisions == []
    idle = simulate(
        arrivals,
        AutoscaleSettings(enabled=True, min_replicas=0, idle_to_zero_after=300),
        SimSettings(cold_start=30, seed=3),
        duration=86400,
    )
    assert len(idle.cold_waits) == 24 and max(idle.cold_waits) == pytest.approx(30.0)
    assert idle.replica_hours < 24 * 400 / 3600  # ~ a cold start + idle time per request


def test_the_simulation_is_deterministic():
    arrivals = [i * 0.7 for i in range(2000)]
    runs = [
        simulate(arrivals, AutoscaleSettings(enabled=True), SimSettings(seed=5)).summary(4)
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
