"""Benchmark: what Hypha costs for large arrays, and p50 `infer` latency per path.

Part 1 (transport): a Hypha gateway in a child process serves an identity "model"; this
process sends 1, 4 and 16 MB float32 arrays and gets them back through Hypha RPC
  - "stock": the embedded server with WebSocket deflate on (what a stock Hypha server does),
  - "proxy": a stock `python -m hypha.server`, the gateway's own leg without deflate, with a
    stock client and with a client connected without deflate (as the client helper does),
  - "embedded": BioEngine's embedded server (no deflate anywhere),
and through the gateway's direct HTTP path.

Part 2 (real model): `bioengine serve` with the HTTP gateway and an embedded Hypha gateway
serving models/unet2d_nuclei_broad (1x1x512x512); p50 of one inference through
  direct Triton (tritonclient to the replica), the HTTP gateway (tritonclient),
  Hypha RPC `infer`, and Hypha with the direct path (bioengine_gateway_hypha.client).

    python bench/bench_hypha.py [--n 20] [--skip-transport] [--skip-model]

Needs hypha[s3], the tritonserver binary (nvidia-pytriton) and the plugins installed.
Not a test: numbers depend on the machine; record them in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "unet2d_nuclei_broad"
BIN = Path(sys.executable).parent


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def p50(samples: list[float]) -> float:
    """Median in milliseconds."""
    return statistics.median(samples) * 1000


# ----------------------------------------------------------------------------- part 1


async def _identity_server(spec: str) -> None:
    """Child process: a Hypha gateway (settings as JSON) over a Service returning its input."""
    from bioengine_gateway_hypha.gateway import HyphaGateway
    from bioengine_gateway_hypha.settings import HyphaGatewaySettings

    from bioengine_core.contracts import BackendContext, ModelInfo, Service

    class Identity(Service):
        def list_models(self):
            t = {"id": "x", "dtype": "float32", "shape": [-1], "axes": ["x"]}
            return [ModelInfo("identity", "identity", "", [t], [dict(t, id="y")], "none")]

        def get_model(self, model_id):
            return {}

        async def infer(self, model_id, inputs, *, timeout=None):
            x = inputs[0] if isinstance(inputs, list) else inputs["x"]
            return {"y": x}

        async def infer_raw(self, *a, **k):
            raise NotImplementedError

        def check_inputs(self, model_id, specs):
            return None

        def model_ids(self):
            return ["identity"]

        async def triton_get(self, model_id, what="metadata", *, version=None):
            return 200, b"{}"

        def ready_replicas(self):
            return 1

        def metrics_text(self):
            return b""

        async def test_model(self, model_id):
            return {}

        def status(self):
            return {}

        async def load_model(self, ref, *, model_id=None):
            raise NotImplementedError

        async def unload_model(self, model_id):
            raise NotImplementedError

        async def scale(self, replicas):
            raise NotImplementedError

    state = Path(tempfile.mkdtemp(prefix="bench-hypha-"))
    gw = HyphaGateway(
        HyphaGatewaySettings(**json.loads(spec)),
        BackendContext(deployment="bench", state_dir=state, config_dir=state),
    )
    await gw.start(Identity())
    print("READY", flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await gw.stop()


async def _transport(url: str, n: int, paths: tuple[str, ...]) -> dict[int, dict[str, float]]:
    from bioengine_gateway_hypha.client import BioEngineClient
    from bioengine_gateway_hypha.wsopts import websocket_compression
    from hypha_rpc import connect_to_server

    server = await connect_to_server({"server_url": url})  # stock client: deflate offered
    svc = await server.get_service("bioengine/bioengine")
    with websocket_compression(False):  # what bioengine_gateway_hypha.client.connect does
        raw_server = await connect_to_server({"server_url": url})
    raw_svc = await raw_server.get_service("bioengine/bioengine")
    fast = BioEngineClient(svc)
    available = {"rpc": svc.infer, "rpc_raw": raw_svc.infer, "direct": fast.infer}
    rows: dict[int, dict[str, float]] = {}
    try:
        for mb in (1, 4, 16):
            x = np.random.default_rng(0).random(mb * 1024 * 1024 // 4, dtype=np.float32)
            calls = {k: available[k] for k in paths}
            samples: dict[str, list[float]] = {k: [] for k in calls}
            for call in calls.values():
                await call("identity", [x])  # warm-up
            # Interleaved, so that load from other processes hits both paths alike.
            for _ in range(max(3, n // mb)):
                for name, call in calls.items():
                    t = time.perf_counter()
                    out = await call("identity", [x])
                    samples[name].append(time.perf_counter() - t)
                    assert np.array_equal(out["y"], x)
            rows[mb] = {k: p50(v) for k, v in samples.items()}
    finally:
        await fast.close()
        await server.disconnect()
        await raw_server.disconnect()
    return rows


def _with_gateway(settings: dict, env: dict[str, str], url: str, n: int, paths: tuple[str, ...]):
    child = subprocess.Popen(
        [sys.executable, __file__, "--identity-server", json.dumps(settings)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )
    try:
        assert child.stdout is not None
        seen = []
        for line in child.stdout:  # hypha-rpc logs to stdout too: wait for our line
            seen.append(line)
            if "READY" in line:
                break
        else:
            raise RuntimeError("identity server failed:\n" + "".join(seen))
        return asyncio.run(_transport(url, n, paths))
    finally:
        if child.stdin:
            child.stdin.close()
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()


def _stock_hypha(port: int, token: str) -> subprocess.Popen:
    """`python -m hypha.server` as a public server runs it (WebSocket deflate on)."""
    import urllib.request

    proc = subprocess.Popen(
        [sys.executable, "-m", "hypha.server", "--from-env", "--host=127.0.0.1", f"--port={port}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HYPHA_ROOT_TOKEN": token},
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/readiness", timeout=2):
                return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("stock hypha server did not start")


def bench_transport(n: int) -> list[dict]:
    """Round trip of 1/4/16 MB arrays (p50 ms) through four set-ups."""
    import secrets

    results: dict[str, dict[int, dict[str, float]]] = {}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Stock Hypha behaviour: every WebSocket leg deflated.
    results["stock"] = _with_gateway(
        {"embedded": True, "port": port, "ws_compression": True, "direct": False},
        {},
        url,
        n,
        ("rpc",),
    )
    # Proxy mode against a stock server: the gateway's own leg is not deflated.
    token = secrets.token_urlsafe(32)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stock = _stock_hypha(port, token)
    try:
        results["proxy"] = _with_gateway(
            {
                "server_url": url,
                "workspace": "bioengine",
                "token_env": "BENCH_HYPHA_TOKEN",
                "direct": False,
            },
            {"BENCH_HYPHA_TOKEN": token},
            url,
            n,
            ("rpc", "rpc_raw"),
        )
    finally:
        stock.terminate()
        stock.wait(30)
    # BioEngine's embedded server: no deflate anywhere; plus the direct path.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    results["embedded"] = _with_gateway(
        {"embedded": True, "port": port}, {}, url, n, ("rpc", "direct")
    )
    return [
        {
            "MB": mb,
            "stock": results["stock"][mb]["rpc"],
            "proxy": results["proxy"][mb]["rpc"],
            "proxy_raw": results["proxy"][mb]["rpc_raw"],
            "rpc": results["embedded"][mb]["rpc"],
            "direct": results["embedded"][mb]["direct"],
        }
        for mb in (1, 4, 16)
    ]


# ----------------------------------------------------------------------------- part 2


def _config(tmp: Path, http_port: int, hypha_port: int) -> Path:
    path = tmp / "site.toml"
    path.write_text(
        f'[engine]\nname = "bench-hypha"\nstate_dir = "{tmp / "state"}"\nreplicas = 1\n\n'
        '[executor]\nkind = "local"\nmode = "process"\n\n[storage]\nkind = "local"\n\n'
        f'[gateways.http]\nkind = "http"\nport = {http_port}\n\n'
        f'[gateways.hypha]\nkind = "hypha"\nembedded = true\nport = {hypha_port}\n\n'
        f'[[models]]\nsource = "folder:{MODEL}"\n'
    )
    return path


def _tc_infer(client, model_id: str, x: np.ndarray) -> np.ndarray:
    import tritonclient.http as tc

    inp = tc.InferInput("raw", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    out = tc.InferRequestedOutput("probability", binary_data=True)
    return client.infer(model_id, [inp], outputs=[out]).as_numpy("probability")


async def _all_paths(
    hypha_url: str, replica: str, http: str, model_id: str, x: np.ndarray, n: int
) -> dict:
    """Interleave the four paths request by request; p50 ms of each."""
    import tritonclient.http as tc
    from bioengine_gateway_hypha.client import BioEngineClient
    from hypha_rpc import connect_to_server

    server = await connect_to_server({"server_url": hypha_url})
    svc = await server.get_service("bioengine/bioengine")
    fast = BioEngineClient(svc)
    clients = {
        name: tc.InferenceServerClient(url, network_timeout=120)
        for name, url in (("triton_direct", replica), ("http_gateway", http))
    }

    async def via_triton(name: str) -> np.ndarray:
        return _tc_infer(clients[name], model_id, x)  # blocking on purpose: no thread hop

    paths = {
        "triton_direct": lambda: via_triton("triton_direct"),
        "http_gateway": lambda: via_triton("http_gateway"),
        "hypha_rpc": lambda: svc.infer(model_id, [x]),
        "hypha_direct": lambda: fast.infer(model_id, [x]),
    }
    samples: dict[str, list[float]] = {k: [] for k in paths}
    try:
        for call in paths.values():
            await call()  # warm-up
        for _ in range(n):
            for name, call in paths.items():
                t = time.perf_counter()
                await call()
                samples[name].append(time.perf_counter() - t)
    finally:
        await fast.close()
        await server.disconnect()
        for c in clients.values():
            c.close()
    return {k: p50(v) for k, v in samples.items()}


def bench_model(n: int) -> dict:
    """p50 ms of one 512x512 inference per path."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-hypha-serve-"))
    http_port, hypha_port = free_port(), free_port()
    config = _config(tmp, http_port, hypha_port)
    lines: list[str] = []
    proc = subprocess.Popen(
        [str(BIN / "bioengine"), "serve", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        deadline = time.monotonic() + 300
        while not any("is serving" in line for line in lines):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("serve failed:\n" + "".join(lines))
            time.sleep(0.3)
        http = f"127.0.0.1:{http_port}"
        import urllib.request

        with urllib.request.urlopen(f"http://{http}/bioengine/status", timeout=10) as resp:
            status = json.loads(resp.read())
        model_id = status["models"][0]["id"]
        replica = status["replicas"][0]["url"].split("://")[1]
        x = np.load(MODEL / "test_input.npy").astype(np.float32)
        result = asyncio.run(
            _all_paths(f"http://127.0.0.1:{hypha_port}", replica, http, model_id, x, n)
        )
        return result
    finally:
        proc.terminate()
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            proc.kill()


def main() -> None:
    """Run the parts asked for and print Markdown tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20, help="requests per path (p50 over them)")
    parser.add_argument("--skip-transport", action="store_true")
    parser.add_argument("--skip-model", action="store_true")
    parser.add_argument("--identity-server", help=argparse.SUPPRESS)
    args = parser.parse_args()
    # hypha-rpc configures logging to stdout on import unless logging is set up already.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
    if args.identity_server:
        asyncio.run(_identity_server(args.identity_server))
        return
    print(f"# bench_hypha ({os.cpu_count()} CPUs, n={args.n})\n")
    if not args.skip_transport:
        rows = bench_transport(args.n)
        print("## Round trip of one float32 array (p50 ms)\n")
        print(
            "| size | stock Hypha (deflate) | proxy: stock server, gateway leg raw | "
            "proxy, client also raw | embedded, no deflate | direct path |"
            "\n|---|---|---|---|---|---|"
        )
        for r in rows:
            print(
                f"| {r['MB']} MB | {r['stock']:.0f} | {r['proxy']:.0f} | {r['proxy_raw']:.0f} | "
                f"{r['rpc']:.0f} | {r['direct']:.0f} |"
            )
        print()
    if not args.skip_model:
        res = bench_model(args.n)
        base = res["triton_direct"]
        print("## unet2d_nuclei_broad, 1x1x512x512 float32 (p50 ms per inference)\n")
        print("| path | p50 ms | vs direct Triton |\n|---|---|---|")
        labels = {
            "triton_direct": "direct Triton (tritonclient -> replica)",
            "http_gateway": "HTTP gateway (tritonclient)",
            "hypha_rpc": "Hypha RPC `infer`",
            "hypha_direct": "Hypha + direct path (client helper)",
        }
        for key, label in labels.items():
            print(f"| {label} | {res[key]:.0f} | {res[key] / base:.2f}x |")


if __name__ == "__main__":
    main()
