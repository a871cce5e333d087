"""Benchmark (issue 12): throughput with 1, 2 and 4 replicas of a CPU-light model, and the cold
start from zero replicas to the first answer.

Throughput: one `bioengine serve` (local executor) with the tiny bundled model, scaled 1 -> 2 ->
4 through the admin API; at each count a closed loop of `--concurrency` clients sends requests
for `--seconds` through the gateway (rounds interleaved: 1,2,4,1,2,4,...). Cold start: a
deployment with `[autoscale] min_replicas = 0` idles to zero, then one request is timed.

    .venv/bin/python bench/bench_replicas.py [--seconds 10] [--rounds 2] [--cold 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from bench_catalog import Serve  # noqa: E402
from loadgen import request_body  # noqa: E402

from bioengine_core.bundled import bundled_path  # noqa: E402

TINY = bundled_path("tiny_affine")
UNET = bundled_path("unet2d_nuclei_broad")


def status(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/bioengine/status", timeout=10) as resp:
        return json.loads(resp.read())


def scale(url: str, n: int) -> None:
    req = urllib.request.Request(
        f"{url}/bioengine/scale", data=json.dumps({"replicas": n}).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    urllib.request.urlopen(req, timeout=120).read()
    deadline = time.monotonic() + 180
    while status(url)["ready_replicas"] != n or len(status(url)["replicas"]) != n:
        if time.monotonic() > deadline:
            raise SystemExit(f"not {n} replicas: {status(url)}")
        time.sleep(0.5)


async def closed_loop(url: str, model: str, body: bytes, headers: dict, conc: int, secs: float):
    done = 0
    end = time.monotonic() + secs
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < end:
                async with session.post(
                    f"{url}/v2/models/{model}/infer", data=body, headers=headers
                ) as resp:
                    await resp.read()
                    if resp.status == 200:
                        done += 1

        await asyncio.gather(*(worker() for _ in range(conc)))
    return done / secs


def throughput(tmp: Path, args) -> dict:
    models = f'[[models]]\nsource = "folder:{TINY}"\n\n[[models]]\nsource = "folder:{UNET}"\n'
    serve = Serve(tmp, "replicas", models)
    url = f"http://{serve.url}"
    cases = {
        "tiny 1x1x4x4": ("tiny_affine", np.load(TINY / "test_input.npy"), "x"),
        "unet2d 512x512": ("unet2d_nuclei_broad", np.load(UNET / "test_input.npy"), "raw"),
    }
    results: dict = {label: {1: [], 2: [], 4: []} for label in cases}
    try:
        for _ in range(args.rounds):
            for n in (1, 2, 4):
                scale(url, n)
                for label, (model, x, name) in cases.items():
                    body, headers = request_body(name, x)
                    secs = args.seconds if "tiny" in label else args.seconds * 2
                    rate = asyncio.run(
                        closed_loop(url, model, body, headers, args.concurrency, secs)
                    )
                    results[label][n].append(rate)
    finally:
        serve.stop()
    out = {}
    for label, per in results.items():
        med = {n: statistics.median(v) for n, v in per.items()}
        out[label] = {
            "req_per_s": {n: round(v, 1) for n, v in med.items()},
            "x2_vs_x1": round(med[2] / med[1], 2),
            "x4_vs_x1": round(med[4] / med[1], 2),
        }
    return out


def cold_start(tmp: Path, rounds: int) -> list[float]:
    body_cfg = (
        f'[[models]]\nsource = "folder:{UNET}"\n\n[autoscale]\nenabled = true\n'
        "min_replicas = 0\nmax_replicas = 1\nidle_to_zero_after = 2\ncooldown = 0\n"
        "scale_down_delay = 1\n"
    )
    serve = Serve(tmp, "cold", body_cfg)
    url = f"http://{serve.url}"
    body, headers = request_body("raw", np.load(UNET / "test_input.npy"))
    waits = []
    try:
        for _ in range(rounds):
            deadline = time.monotonic() + 120
            while status(url)["replicas"]:
                if time.monotonic() > deadline:
                    raise SystemExit("did not idle to zero")
                time.sleep(0.5)
            req = urllib.request.Request(
                f"{url}/v2/models/unet2d_nuclei_broad/infer", data=body, headers=headers
            )
            t0 = time.monotonic()
            with urllib.request.urlopen(req, timeout=300) as resp:
                resp.read()
            waits.append(round(time.monotonic() - t0, 2))
    finally:
        serve.stop()
    return waits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--cold", type=int, default=3, help="cold starts to time")
    args = ap.parse_args()
    report: dict = {"cpus": psutil.cpu_count(), "load_avg": list(psutil.getloadavg())}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        report["cold_start_s"] = cold_start(tmp, args.cold)
        print("cold start from zero to first answer (s):", report["cold_start_s"])
        report["throughput"] = throughput(tmp, args)
    report["load_avg_after"] = list(psutil.getloadavg())
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
