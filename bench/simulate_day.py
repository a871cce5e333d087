"""A day in simulation (issue 12): the autoscaler policy over a 24-hour request trace.

No replica runs: `bioengine_core.testing.simclock` simulates replicas that take `--cold-start`
seconds to become ready and serve `--concurrency` requests at a time for `--service-time`
seconds each (exponential), with the policy asked every 2 s as the supervisor does. For several
`[autoscale]` settings it prints the replica-hours paid for, the saving against always-on
replicas, and the requests that waited for a cold start.

The synthetic day is a lab's (seeded Poisson arrivals): a quiet night, a morning ramp, a
workshop (30 people, steady requests plus a burst every 15 minutes when everyone runs the
next exercise), a lunch dip, the afternoon and an evening tail. `--trace FILE.csv` replays a
recorded day instead: the first column holds request times (seconds, Unix time or ISO 8601).

    .venv/bin/python bench/simulate_day.py [--seed 1] [--trace requests.csv]
"""

from __future__ import annotations

import argparse
import csv
import math
import random
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bioengine_core.autoscale import AutoscaleSettings  # noqa: E402
from bioengine_core.testing.simclock import SimSettings, poisson, simulate  # noqa: E402

H = 3600.0
WORKSHOP = (10.5 * H, 12.0 * H)


def lab_rate(t: float, night: float = 1 / H) -> float:
    """Requests per second of the synthetic day at `t` seconds after midnight (`night`: the
    rate from midnight to 7:00, default one an hour: a night owl, a cron job)."""
    h = t / H
    if h < 7:
        return night
    if h < 9:
        return night + (h - 7) / 2 * 0.3  # people arrive
    if WORKSHOP[0] <= t < WORKSHOP[1]:
        return 2.0  # 30 participants working through a notebook
    if h < 12:
        return 0.3
    if h < 13.5:
        return 0.03  # lunch
    if h < 17:
        return 0.25
    if h < 24:
        return 0.25 * math.exp(-(h - 17) / 1.2) + night  # the evening tail
    return 0.0


def synthetic_day(seed: int, night_per_hour: float = 1.0) -> list[float]:
    """Arrival times (s) of one synthetic lab day."""
    rng = random.Random(seed)
    arrivals = poisson(lambda t: lab_rate(t, night_per_hour / H), 0.0, 24 * H, 2.0, rng)
    # every 15 minutes of the workshop the 30 participants run the next exercise within a
    # minute, 4 requests each
    start = WORKSHOP[0]
    while start < WORKSHOP[1]:
        arrivals += [start + rng.uniform(0, 60) for _ in range(30 * 4)]
        start += 15 * 60
    return sorted(arrivals)


def read_trace(path: Path) -> list[float]:
    """Request times from the first column of a CSV file, as seconds from the first one."""
    times = []
    with path.open(newline="") as f:
        for row in csv.reader(f):
            if not row or not row[0].strip():
                continue
            cell = row[0].strip()
            try:
                times.append(float(cell))
            except ValueError:
                try:
                    times.append(datetime.fromisoformat(cell).timestamp())
                except ValueError:
                    continue  # a header
    if not times:
        raise SystemExit(f"{path}: no request times in its first column")
    first = min(times)
    return sorted(t - first for t in times)


def configs(cold: float, slurm: float, top: int, fixed: int) -> list[tuple[str, float, dict]]:
    """(name, cold start, [autoscale] settings) of each row."""
    auto = {"enabled": True, "max_replicas": top}
    return [
        (f"always on, {top} replicas", cold, {"min_replicas": top, "max_replicas": top}),
        (f"always on, {fixed} replicas", cold, {"min_replicas": fixed, "max_replicas": fixed}),
        ("always on, 1 replica", cold, {"min_replicas": 1, "max_replicas": 1}),
        ("min 1 (defaults: up 30 s, down 300 s)", cold, {**auto, "min_replicas": 1}),
        (
            "min 1, eager (up 10 s, down 120 s, cooldown 30 s)",
            cold,
            {**auto, "min_replicas": 1, "scale_up_delay": 10, "scale_down_delay": 120,
             "cooldown": 30},
        ),
        (
            "min 1, calm (up 60 s, down 900 s, cooldown 120 s)",
            cold,
            {**auto, "min_replicas": 1, "scale_up_delay": 60, "scale_down_delay": 900,
             "cooldown": 120},
        ),
        ("min 0, idle 15 min", cold, {**auto, "min_replicas": 0, "idle_to_zero_after": 900}),
        ("min 0, idle 60 min", cold, {**auto, "min_replicas": 0, "idle_to_zero_after": 3600}),
        ("min 0, idle 15 min, SLURM", slurm, {**auto, "min_replicas": 0,
                                               "idle_to_zero_after": 900}),
        ("min 0, idle 60 min, SLURM", slurm, {**auto, "min_replicas": 0,
                                               "idle_to_zero_after": 3600}),
        ("min 1, SLURM", slurm, {**auto, "min_replicas": 1}),
    ]  # fmt: skip


def main() -> None:
    """Run every row over the day and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--trace", type=Path, help="CSV whose first column holds request times")
    ap.add_argument("--night-rate", type=float, default=1.0,
                    help="requests per hour from midnight to 7:00 (synthetic day)")  # fmt: skip
    ap.add_argument("--cold-start", type=float, default=30.0, help="local cold start (s)")
    ap.add_argument("--slurm-cold-start", type=float, default=180.0,
                    help="cold start of the SLURM rows: queue wait + start (s)")  # fmt: skip
    ap.add_argument("--service-time", type=float, default=1.0, help="mean s per request")
    ap.add_argument("--concurrency", type=int, default=2, help="requests per replica at once")
    ap.add_argument("--target", type=float, default=1.5, help="target_inflight_per_replica")
    ap.add_argument("--max", type=int, default=4, help="max_replicas")
    ap.add_argument("--fixed", type=int, default=2, help="also compare with N always on")
    ap.add_argument("--bound", type=float, default=10.0, help="report waits longer than this")
    ap.add_argument("--log", type=int, metavar="ROW", help="print the decisions of row ROW (1-)")
    args = ap.parse_args()

    began = time.perf_counter()
    arrivals = read_trace(args.trace) if args.trace else synthetic_day(args.seed, args.night_rate)
    duration = max(24 * H, math.ceil((arrivals[-1] + 1) / H) * H)
    what = args.trace or f"synthetic lab day, seed {args.seed}, {args.night_rate:g}/h at night"
    print(
        f"{what}: {len(arrivals)} requests over {duration / H:.0f} h; replicas: "
        f"{args.service_time:g} s per request (mean), {args.concurrency} at once; target "
        f"{args.target:g} in flight per replica; waits > {args.bound:g} s counted\n"
    )
    print(
        "| settings | cold start | replica-hours | saving vs always-on "
        f"{args.max} / {args.fixed} | waited for a cold start: n, p50 / p99 / max | waited > "
        f"{args.bound:g} s | failed | p99 wait | decisions | most replicas, by hour 00-23 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    logged = []
    rows = configs(args.cold_start, args.slurm_cold_start, args.max, args.fixed)
    for row, (name, cold, values) in enumerate(rows, 1):
        settings = AutoscaleSettings(target_inflight_per_replica=args.target, **values)
        sim = SimSettings(
            cold_start=cold,
            service_time=args.service_time,
            concurrency=args.concurrency,
            wait_bound=args.bound,
            seed=args.seed,
        )
        r = simulate(arrivals, settings, sim, duration=duration)
        s = r.summary(args.max)
        cold_cell = (
            f"{s['cold_waited']}: {s['cold_wait_p50']:.0f} / {s['cold_wait_p99']:.0f} / "
            f"{s['cold_wait_max']:.0f} s"
            if s["cold_waited"]
            else "0"
        )
        hours = "".join(str(n) if n < 10 else "+" for _, n, _ in r.hourly[:24])
        print(
            f"| {name} | {cold:.0f} s | {r.replica_hours:.1f} | {r.saving(args.max):.0%} / "
            f"{r.saving(args.fixed):.0%} | {cold_cell} | {s['over_bound']} | {s['failed']} | "
            f"{s['wait_p99']:.1f} s | {s['decisions']} | `{hours}` |"
        )
        if row == args.log:
            logged = [(name, r.decisions)]
    for name, decisions in logged:
        print(f"\ndecisions of '{name}':")
        for d in decisions:
            clock = time.strftime("%H:%M:%S", time.gmtime(d.at))
            print(f"  {clock}  {d.reason}")
    print(f"\n({time.perf_counter() - began:.1f} s)")


if __name__ == "__main__":
    main()
