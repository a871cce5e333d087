"""Benchmark: catalog mode (issue 10).

1. Cold load: time from the first request to its answer for a model that is in the verified
   cache but not loaded (unet2d_nuclei_broad as `affable-shark`, and the tiny model), with
   `max_loaded = 1` so that alternating requests unload and reload each time.
2. Latency of a loaded model in catalog mode vs the same model in a fixed `[[models]]` list:
   two deployments, requests interleaved one by one so machine noise hits both alike.
3. Memory a replica pays per additional loaded model: unique memory (USS) and RSS of the
   replica's Triton process tree with 0, 1, 10 and 50 copies of the tiny model loaded.

Everything runs against the zoo emulator (no internet) and real Triton (local executor).

    .venv/bin/python bench/bench_catalog.py [--requests 200] [--models 1,10,50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import tritonclient.http as httpclient

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

from bioengine_core.bundled import bundled_path  # noqa: E402
from bioengine_core.testing.zoo import bundled_zoo  # noqa: E402

UNET = bundled_path("unet2d_nuclei_broad")
TINY = bundled_path("tiny_affine")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Serve:
    """`bioengine serve` in a subprocess; its Triton processes found through psutil."""

    def __init__(self, tmp: Path, name: str, body: str):
        self.port = free_port()
        self.state = tmp / name
        cfg = tmp / f"{name}.toml"
        cfg.write_text(
            f'[engine]\nname = "{name}"\nstate_dir = "{self.state}"\n\n'
            '[executor]\nkind = "local"\nmode = "process"\n\n'
            f"[gateways.http]\nport = {self.port}\n\n{body}"
        )
        self.proc = subprocess.Popen(
            [str(BIN / "bioengine"), "serve", "--config", str(cfg)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        deadline = time.monotonic() + 300
        while not any("is serving" in x for x in self.lines):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("serve did not start:\n" + "\n".join(self.lines))
            time.sleep(0.2)
        self.url = f"127.0.0.1:{self.port}"

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def stop(self) -> None:
        self.proc.send_signal(2)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def triton_tree(self) -> list[psutil.Process]:
        """The replica's tritonserver and its python backend stubs."""
        for p in psutil.process_iter(["name", "cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "tritonserver" in (p.info["name"] or "") and str(self.state) in cmd:
                return [p, *p.children(recursive=True)]
        raise SystemExit("no tritonserver process found")

    def memory(self) -> tuple[float, float, int]:
        """(USS MiB, RSS MiB, processes) of the Triton tree."""
        uss = rss = 0.0
        procs = self.triton_tree()
        for p in procs:
            info = p.memory_full_info()
            uss += info.uss
            rss += info.rss
        return uss / 2**20, rss / 2**20, len(procs)


def infer(client: httpclient.InferenceServerClient, model: str, x: np.ndarray, name: str) -> None:
    inp = httpclient.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    client.infer(model, [inp])


def cold_loads(tmp: Path, zoo_toml: str, rounds: int) -> dict[str, list[float]]:
    body = f"{zoo_toml}\n[catalog]\nenabled = true\nmax_loaded = 1\nload_timeout = 600\n"
    serve = Serve(tmp, "cold", body)
    client = httpclient.InferenceServerClient(serve.url, network_timeout=600)
    x_unet = np.load(UNET / "test_input.npy")
    x_tiny = np.load(TINY / "test_input.npy")
    out: dict[str, list[float]] = {"unet2d (affable-shark)": [], "tiny (tiny-affine)": []}
    try:
        infer(client, "affable-shark", x_unet, "raw")  # download + verify into the cache
        infer(client, "tiny-affine", x_tiny, "x")
        for _ in range(rounds):
            for label, model, x, name in [
                ("unet2d (affable-shark)", "affable-shark", x_unet, "raw"),
                ("tiny (tiny-affine)", "tiny-affine", x_tiny, "x"),
            ]:
                started = time.perf_counter()
                infer(client, model, x, name)  # the other model was loaded: this one is cold
                out[label].append(time.perf_counter() - started)
        assert sum("unloaded (least recently used" in x for x in serve.lines) >= 2 * rounds
    finally:
        client.close()
        serve.stop()
    return out


def catalog_vs_fixed(
    tmp: Path, zoo_toml: str, requests: int, shared: bool = True
) -> dict[str, dict[str, float]]:
    fixed = Serve(tmp, "fixed", f'[[models]]\nsource = "folder:{UNET}"\nid = "affable-shark"\n'
                  f'\n[[models]]\nsource = "folder:{TINY}"\nid = "tiny-affine"\n')  # fmt: skip
    runner = "true" if shared else "false"
    catalog = Serve(
        tmp, "catalog", f"{zoo_toml}\n[catalog]\nenabled = true\nshared_runner = {runner}\n"
    )
    results: dict[str, dict[str, float]] = {}
    try:
        clients = {
            "fixed": httpclient.InferenceServerClient(fixed.url, network_timeout=600),
            "catalog": httpclient.InferenceServerClient(catalog.url, network_timeout=600),
        }
        for label, model, x, name, n in [
            ("unet2d 512x512", "affable-shark", np.load(UNET / "test_input.npy"), "raw", 40),
            ("tiny 1x1x4x4", "tiny-affine", np.load(TINY / "test_input.npy"), "x", requests),
        ]:
            times: dict[str, list[float]] = {"fixed": [], "catalog": []}
            for c in clients.values():
                for _ in range(3):
                    infer(c, model, x, name)  # warm up (and load, in catalog mode)
            for _ in range(n):
                for mode, c in clients.items():
                    started = time.perf_counter()
                    infer(c, model, x, name)
                    times[mode].append(time.perf_counter() - started)
            p50 = {m: statistics.median(t) * 1000 for m, t in times.items()}
            results[label] = {**p50, "ratio": p50["catalog"] / p50["fixed"]}
        for c in clients.values():
            c.close()
    finally:
        fixed.stop()
        catalog.stop()
    return results


def memory_per_model(tmp: Path, zoo, counts: list[int]) -> list[tuple[int, float, float, int]]:
    top = max(counts)
    for i in range(1, top + 1):
        zoo.publish(TINY, f"tiny-{i:03d}")
    body = f"{zoo.toml()}\n[catalog]\nenabled = true\nload_timeout = 600\n"
    serve = Serve(tmp, "memory", body)
    client = httpclient.InferenceServerClient(serve.url, network_timeout=600)
    x = np.load(TINY / "test_input.npy")
    rows = [(0, *serve.memory())]
    try:
        loaded = 0
        for target in sorted(counts):
            while loaded < target:
                loaded += 1
                infer(client, f"tiny-{loaded:03d}", x, "x")
            time.sleep(2)
            rows.append((target, *serve.memory()))
            print(f"  {target} loaded: USS {rows[-1][1]:.0f} MiB, RSS {rows[-1][2]:.0f} MiB")
    finally:
        client.close()
        serve.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default="1,10,50")
    ap.add_argument("--only", choices=["cold", "latency", "memory"])
    ap.add_argument(
        "--own-stubs", action="store_true", help="catalog models without the shared runner"
    )
    args = ap.parse_args()
    counts = [int(c) for c in args.models.split(",")]
    with tempfile.TemporaryDirectory() as d, bundled_zoo() as zoo:
        tmp = Path(d)
        report: dict[str, object] = {"load_avg": list(psutil.getloadavg())}
        if args.only in (None, "cold"):
            cold = cold_loads(tmp, zoo.toml(), args.rounds)
            report["cold_load_s"] = {k: statistics.median(v) for k, v in cold.items()}
            print("cold load (cached, not loaded), median s:", report["cold_load_s"])
        if args.only in (None, "latency"):
            report["catalog_vs_fixed"] = catalog_vs_fixed(
                tmp, zoo.toml(), args.requests, shared=not args.own_stubs
            )
            print("catalog vs fixed p50 (ms):", report["catalog_vs_fixed"])
        if args.only in (None, "memory"):
            rows = memory_per_model(tmp, zoo, counts)
            base = rows[0]
            report["memory"] = [
                {
                    "loaded": n,
                    "uss_mib": round(u),
                    "rss_mib": round(r),
                    "processes": p,
                    "uss_per_model_mib": round((u - base[1]) / n) if n else None,
                }
                for n, u, r, p in rows
            ]
        report["load_avg_after"] = list(psutil.getloadavg())
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
