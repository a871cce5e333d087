"""Load generator: drive a BioEngine (or any KServe v2) endpoint with a request-rate profile and
report successes, failures and latency percentiles over time.

Open loop: requests are sent at the profile's rate whether or not earlier ones were answered
(as real users do), each with its own deadline, so overload shows as failures and latency, not
as a slower generator. Profiles:

- `steps:2@30,10@60,2@30`       2 req/s for 30 s, then 10 req/s for 60 s, then 2 req/s for 30 s
- `burst:1,20,30,5@120`         1 req/s base, 20 req/s for 5 s every 30 s, for 120 s
- `trace:FILE.csv`              replay the timestamps (seconds, first column) of a recorded day

    .venv/bin/python bench/loadgen.py --url http://127.0.0.1:9000 --model tiny_affine \\
        --input models/tiny_affine/test_input.npy --profile steps:5@20,20@20 [--window 5]
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import tritonclient.http as httpclient


def parse_profile(text: str, seed: int = 0) -> list[float]:
    """Send times (seconds from start) for a profile string."""
    kind, _, spec = text.partition(":")
    rng = random.Random(seed)
    times: list[float] = []
    if kind == "steps":
        start = 0.0
        for step in spec.split(","):
            rate, _, seconds = step.partition("@")
            n = int(float(rate) * float(seconds))
            times += [start + i / float(rate) for i in range(n)] if float(rate) > 0 else []
            start += float(seconds)
    elif kind == "burst":
        base, peak, every, rest = spec.split(",")
        length, _, total = rest.partition("@")
        t = 0.0
        while t < float(total):
            in_burst = (t % float(every)) < float(length)
            rate = float(peak) if in_burst else float(base)
            times.append(t)
            t += rng.expovariate(rate) if rate > 0 else float(every)
    elif kind == "trace":
        with Path(spec).open() as f:
            raw = sorted(float(row[0]) for row in csv.reader(f) if row and row[0][0].isdigit())
        times = [r - raw[0] for r in raw] if raw else []
    else:
        raise SystemExit(f"unknown profile {text!r}: use steps:, burst: or trace:")
    return times


@dataclass
class Window:
    """What happened to the requests sent in one time window."""

    sent: int = 0
    ok: int = 0
    failed: Counter = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)

    def row(self, start: float) -> dict:
        lat = sorted(self.latencies)

        def pct(p: float) -> float | None:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))] * 1000, 1) if lat else None

        return {
            "t": start,
            "sent": self.sent,
            "ok": self.ok,
            "failed": dict(self.failed),
            "p50_ms": pct(0.5),
            "p95_ms": pct(0.95),
            "p99_ms": pct(0.99),
        }


def request_body(model_input: str, x: np.ndarray) -> tuple[bytes, dict[str, str]]:
    """A KServe v2 binary request as tritonclient builds it."""
    inp = httpclient.InferInput(model_input, list(x.shape), "FP32")
    inp.set_data_from_numpy(x.astype(np.float32), binary_data=True)
    body, header_length = httpclient.InferenceServerClient.generate_request_body([inp])
    headers = {"Content-Type": "application/octet-stream"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = str(header_length)
    return body, headers


async def run(
    url: str, model: str, body: bytes, headers: dict[str, str], times: list[float],
    window: float, timeout: float,
) -> list[dict]:  # fmt: skip
    """Send one request at each time of `times`; the rows of each window."""
    windows: dict[int, Window] = {}
    connector = aiohttp.TCPConnector(limit=1000)
    started = time.monotonic()
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(at: float) -> None:
            w = windows.setdefault(int(at // window), Window())
            w.sent += 1
            t0 = time.monotonic()
            try:
                async with session.post(
                    f"{url}/v2/models/{model}/infer",
                    data=body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=timeout),
                ) as resp:
                    await resp.read()
                    if resp.status == 200:
                        w.ok += 1
                        w.latencies.append(time.monotonic() - t0)
                    else:
                        w.failed[str(resp.status)] += 1
            except TimeoutError:
                w.failed["timeout"] += 1
            except aiohttp.ClientError as exc:
                w.failed[type(exc).__name__] += 1

        tasks = []
        for at in times:
            delay = started + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(at)))
        await asyncio.gather(*tasks)
    return [windows[k].row(k * window) for k in sorted(windows)]


def summary(rows: list[dict]) -> dict:
    sent = sum(r["sent"] for r in rows)
    ok = sum(r["ok"] for r in rows)
    failed: Counter = Counter()
    for r in rows:
        failed.update(r["failed"])
    p50s = [r["p50_ms"] for r in rows if r["p50_ms"] is not None]
    return {
        "sent": sent,
        "ok": ok,
        "failed": dict(failed),
        "median_p50_ms": statistics.median(p50s) if p50s else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:9000")
    ap.add_argument("--model", required=True)
    ap.add_argument("--input", required=True, help=".npy file sent as the model's input")
    ap.add_argument("--input-name", default=None, help="tensor name (default: ask the model)")
    ap.add_argument("--profile", default="steps:5@20")
    ap.add_argument("--window", type=float, default=5.0)
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    x = np.load(args.input)
    name = args.input_name
    if name is None:
        client = httpclient.InferenceServerClient(args.url.split("://", 1)[-1])
        name = client.get_model_metadata(args.model)["inputs"][0]["name"]
        client.close()
    body, headers = request_body(name, x)
    times = parse_profile(args.profile, args.seed)
    rows = asyncio.run(run(args.url, args.model, body, headers, times, args.window, args.timeout))
    if args.json:
        print(json.dumps({"windows": rows, "summary": summary(rows)}, indent=1))
        return
    print(f"{'t':>6} {'sent':>5} {'ok':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}  failed")
    for r in rows:
        print(
            f"{r['t']:>6.0f} {r['sent']:>5} {r['ok']:>5} {r['p50_ms'] or '-':>8} "
            f"{r['p95_ms'] or '-':>8} {r['p99_ms'] or '-':>8}  {r['failed'] or ''}"
        )
    print(summary(rows))


if __name__ == "__main__":
    main()
