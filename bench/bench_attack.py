"""Benchmark: do callers with a 1 ms deadline slow everybody else down?

Starts `bioengine serve` (local executor, one replica, both bundled models) and measures an
ordinary caller's latency (tritonclient, the U-Net at 512x512 and the tiny model) alone and
while an attacker loops requests with `timeout=1000` µs (KServe `parameters.timeout`),
interleaved round by round so machine noise hits both alike. Reports p50 with/without and the
attacker's answers (all should be 504).

    .venv/bin/python bench/bench_attack.py [--requests 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_local import bench_cases, make_request, measure, merge, start_serve, status  # noqa: E402


def attacker(
    url: str, model: str, x: np.ndarray, name: str, rate: float, stop, counts, control: bool
):
    """Loop requests with a 1 ms deadline (or, as a control, health probes) until `stop`,
    at most `rate` per second (0: as fast as it can)."""
    import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException

    client = tc.InferenceServerClient(url.split("://")[1], network_timeout=60)
    inp = tc.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    gap = 1.0 / rate if rate else 0.0
    next_at = time.monotonic()
    while not stop.is_set():
        if gap:
            next_at += gap
            time.sleep(max(0.0, next_at - time.monotonic()))
        if control:
            client.is_server_live()
            counts["control"] = counts.get("control", 0) + 1
            continue
        try:
            client.infer(model, [inp], timeout=1000)
            key = "200"
        except InferenceServerException as exc:
            key = str(exc.status())
        counts[key] = counts.get(key, 0) + 1
    client.close()


def under(url: str, send, n: int, args: tuple, control: bool) -> dict:
    """Measure the ordinary caller while an attacker process runs."""
    manager = multiprocessing.Manager()
    stop, counts = manager.Event(), manager.dict()
    proc = multiprocessing.Process(target=attacker, args=(*args, stop, counts, control))
    proc.start()
    time.sleep(1.0)  # let it reach its pace
    result = measure(url, send, 1, n)
    stop.set()
    proc.join(30)
    result["attacker"] = dict(counts)
    manager.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--rate", type=float, default=0.0, help="attacker requests per second (0: unbounded)"
    )
    args = parser.parse_args()
    cases = {label: case[:4] for label, case in bench_cases().items()}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_serve(Path(tmp))
        try:
            for label, (model, x, iname, oname) in cases.items():
                send = make_request(model, x, iname, oname)
                n = args.requests * (4 if "tiny" in label else 1)
                alone, attacked, control = [], [], []
                seen: Counter = Counter()
                for _ in range(args.rounds):
                    alone.append(measure(url, send, 1, n))
                    attack = (url, model, x, iname, args.rate)
                    got = under(url, send, n, attack, control=False)
                    seen.update(got.pop("attacker"))
                    attacked.append(got)
                    ctl = under(url, send, n, attack, control=True)
                    seen.update(ctl.pop("attacker"))
                    control.append(ctl)
                a, b, c = merge(alone), merge(attacked), merge(control)
                replicas = status(url)["replicas"]
                print(
                    f"{label}: p50 alone {a['p50']:.2f} ms; with a 1 ms-deadline attacker "
                    f"{b['p50']:.2f} ms (x{b['p50'] / a['p50']:.3f}); with a control process "
                    f"looping health probes {c['p50']:.2f} ms (x{c['p50'] / a['p50']:.3f}); "
                    f"attacker answers {dict(seen)}; replicas routed: "
                    f"{[r['routed'] for r in replicas]}",
                    flush=True,
                )
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)


if __name__ == "__main__":
    main()
