"""Benchmark: in-process onnxruntime (floor) vs direct Triton vs through the BioEngine gateway.

Starts `bioengine serve` (local executor, one replica, both bundled models), then measures the
same requests against the replica's own Triton URL and against the gateway, interleaved round by
round so that machine noise hits both alike. Reports p50/p99 latency and throughput at
concurrency 1 and 8 and the gateway/direct ratios.

    .venv/bin/python bench/bench_local.py [--requests 200] [--rounds 3] [--write]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
UNET = ROOT / "models" / "unet2d_nuclei_broad"
TINY = ROOT / "models" / "tiny_affine"


def bench_cases() -> dict[str, tuple]:
    """Label -> (model id, input array, input name, output name, ONNX weights) of both models."""
    return {
        "unet2d 512x512": (
            "unet2d_nuclei_broad",
            np.load(UNET / "test_input.npy"),
            "raw",
            "probability",
            UNET / "weights.onnx",
        ),
        "tiny 1x1x4x4": (
            "tiny_affine",
            np.load(TINY / "test_input.npy"),
            "x",
            "y",
            TINY / "weights.onnx",
        ),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_serve(tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cfg = tmp / "bench.toml"
    cfg.write_text(
        f'[engine]\nname = "bench"\nstate_dir = "{tmp / "state"}"\nreplicas = 1\n\n'
        '[executor]\nkind = "local"\nmode = "process"\n\n[storage]\nkind = "local"\n\n'
        f"[gateways.http]\nport = {port}\n\n"
        f'[[models]]\nsource = "folder:{UNET}"\n\n[[models]]\nsource = "folder:{TINY}"\n'
    )
    proc = subprocess.Popen(
        [str(BIN / "bioengine"), "serve", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(x) for x in proc.stdout], daemon=True).start()
    deadline = time.monotonic() + 300
    while not any("is serving" in x for x in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("serve failed:\n" + "".join(lines))
        time.sleep(0.2)
    return proc, url


def status(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/bioengine/status") as r:
        return json.loads(r.read())


def make_request(model: str, x: np.ndarray, in_name: str, out_name: str):
    import tritonclient.http as tc

    def send(client) -> None:
        inp = tc.InferInput(in_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        client.infer(model, [inp], outputs=[tc.InferRequestedOutput(out_name, binary_data=True)])

    return send


def measure(url: str, send, concurrency: int, requests: int) -> dict:
    """Latency percentiles and throughput of `requests` requests from `concurrency` clients."""
    import tritonclient.http as tc

    latencies: list[float] = []
    per_worker = max(1, requests // concurrency)
    barrier = threading.Barrier(concurrency + 1)

    def worker(_: int) -> None:
        # tritonclient.http is gevent based: each thread needs its own client
        client = tc.InferenceServerClient(url.split("://")[1], network_timeout=300)
        send(client)  # warm the connection
        barrier.wait()
        for _ in range(per_worker):
            t0 = time.perf_counter()
            send(client)
            latencies.append(time.perf_counter() - t0)
        client.close()

    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(worker, i) for i in range(concurrency)]
        barrier.wait()
        t0 = time.perf_counter()
        for f in futures:
            f.result()
        wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "rps": len(lat) / wall,
        "n": len(lat),
    }


def floor_onnxruntime(weights: Path, x: np.ndarray, in_name: str, requests: int) -> dict:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(weights), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name or in_name
    sess.run(None, {name: x})
    lat = []
    t0 = time.perf_counter()
    for _ in range(requests):
        t = time.perf_counter()
        sess.run(None, {name: x})
        lat.append(time.perf_counter() - t)
    wall = time.perf_counter() - t0
    lat_ms = np.array(lat) * 1000
    return {
        "p50": float(np.percentile(lat_ms, 50)),
        "p99": float(np.percentile(lat_ms, 99)),
        "rps": len(lat) / wall,
        "n": len(lat),
    }


def merge(results: list[dict]) -> dict:
    """Median of each statistic over the rounds."""
    return {k: float(np.median([r[k] for r in results])) for k in results[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=160, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--write", action="store_true", help="append the table to RESULTS.md")
    parser.add_argument("--only", choices=["unet", "tiny"], help="run one case only")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    args = parser.parse_args()
    cases = bench_cases()
    with tempfile.TemporaryDirectory() as tmp:
        proc, gateway = start_serve(Path(tmp))
        try:
            direct = status(gateway)["replicas"][0]["url"]
            rows = []
            for label, (model, x, iname, oname, weights) in cases.items():
                if args.only and not label.startswith(args.only):
                    continue
                send = make_request(model, x, iname, oname)
                n = args.requests if "tiny" in label else max(24, args.requests // 4)
                floor = floor_onnxruntime(weights, x, iname, n)
                for conc in args.concurrency:
                    d_runs, g_runs = [], []
                    for _ in range(args.rounds):
                        d_runs.append(measure(direct, send, conc, n))
                        g_runs.append(measure(gateway, send, conc, n))
                    d, g = merge(d_runs), merge(g_runs)
                    rows.append((label, conc, floor if conc == 1 else None, d, g))
                    print(
                        f"{label} c={conc}: direct p50 {d['p50']:.2f} ms, gateway p50 "
                        f"{g['p50']:.2f} ms (x{g['p50'] / d['p50']:.3f}, "
                        f"+{g['p50'] - d['p50']:.2f} ms)",
                        flush=True,
                    )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    table = [
        "| case | conc | onnxruntime in-process p50 | direct Triton p50 / p99 / req/s "
        "| gateway p50 / p99 / req/s | gateway/direct p50 | gateway-direct p50 |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, conc, floor, d, g in rows:
        fl = f"{floor['p50']:.2f} ms" if floor else "—"
        table.append(
            f"| {label} | {conc} | {fl} | {d['p50']:.2f} / {d['p99']:.2f} ms / {d['rps']:.0f} "
            f"| {g['p50']:.2f} / {g['p99']:.2f} ms / {g['rps']:.0f} | "
            f"{g['p50'] / d['p50']:.3f}× | {g['p50'] - d['p50']:+.2f} ms |"
        )
    text = "\n".join(table)
    print(text)
    if args.write:
        with open(ROOT / "bench" / "RESULTS.md", "a") as fh:
            fh.write(
                f"\n### bench_local.py — {time.strftime('%Y-%m-%d %H:%M')} "
                f"({os.cpu_count()} cores)\n\n{text}\n"
            )


if __name__ == "__main__":
    main()
