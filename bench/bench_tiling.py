"""Benchmark (issue 11): a 2048x2048 image through the engine's tiling on 1 and 2 replicas,
against the same number of whole 512x512 requests sent one by one (the tiling overhead), and
the per-block cost against in-process onnxruntime (the floor). Rounds interleaved.

    .venv/bin/python bench/bench_tiling.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import tritonclient.http as httpclient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from bench_catalog import Serve  # noqa: E402
from bench_replicas import scale  # noqa: E402

from bioengine_core.bundled import bundled_path  # noqa: E402

UNET = bundled_path("unet2d_nuclei_broad")


def infer(client: httpclient.InferenceServerClient, x: np.ndarray) -> None:
    inp = httpclient.InferInput("raw", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    client.infer("unet2d_nuclei_broad", [inp])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import onnxruntime as ort

    tile = np.load(UNET / "test_input.npy")
    big = np.tile(tile, (1, 1, 4, 4))  # 2048x2048
    session = ort.InferenceSession(str(UNET / "weights.onnx"), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: tile}
    report: dict = {"load_avg": list(psutil.getloadavg())}
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as d:
        serve = Serve(Path(d), "tiling", f'[[models]]\nsource = "folder:{UNET}"\n')
        url = f"http://{serve.url}"
        client = httpclient.InferenceServerClient(serve.url, network_timeout=600)
        try:
            infer(client, big)  # builds the engine-side pipeline once
            blocks = None
            for _ in range(args.rounds):
                for n in (1, 2):
                    scale(url, n)
                    t0 = time.perf_counter()
                    infer(client, big)
                    times.setdefault(f"2048x2048 tiled, {n} replica(s)", []).append(
                        time.perf_counter() - t0
                    )
                scale(url, 1)
                if blocks is None:  # 512 blocks with a 32-pixel halo: 448 new pixels per block
                    blocks = math.ceil(2048 / 448) ** 2
                t0 = time.perf_counter()
                for _ in range(blocks):
                    infer(client, tile)
                times[f"{blocks} whole 512x512 requests, 1 replica"] = times.get(
                    f"{blocks} whole 512x512 requests, 1 replica", []
                ) + [time.perf_counter() - t0]
                t0 = time.perf_counter()
                for _ in range(blocks):
                    session.run(None, feed)
                times.setdefault(f"{blocks} onnxruntime in-process (floor)", []).append(
                    time.perf_counter() - t0
                )
        finally:
            client.close()
            serve.stop()
    med = {k: round(statistics.median(v), 3) for k, v in times.items()}
    report["seconds"] = med
    keys = list(med)
    tiled1, tiled2, whole, floor = (med[k] for k in keys)
    report["tiled_1_vs_whole_requests"] = round(tiled1 / whole, 3)
    report["tiled_2_vs_tiled_1"] = round(tiled2 / tiled1, 3)
    report["whole_request_vs_floor"] = round(whole / floor, 3)
    report["blocks"] = blocks
    report["load_avg_after"] = list(psutil.getloadavg())
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
