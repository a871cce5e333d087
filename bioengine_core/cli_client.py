"""`bioengine infer` and `bioengine status`: the client side of the command line.

Both talk to a running gateway over HTTP (KServe v2 with a stock Triton client for `infer`,
`/bioengine/status` for `status`) with an optional API token and a private CA.
"""

from __future__ import annotations

import json
import os
import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.table import Table

from .cli_common import console, err, load
from .util import connect_host, url_host

TokenFileOpt = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        help="File holding an API token for the gateway (or set BIOENGINE_TOKEN; never pass "
        "a token on the command line, where other users can read it).",
    ),
]
CaOpt = Annotated[
    Path | None, typer.Option("--cacert", help="CA certificate to trust for an https:// URL.")
]


def _token(token_file: Path | None) -> str | None:
    """The API token from --token-file or BIOENGINE_TOKEN (None: call without one)."""
    if token_file is not None:
        try:
            value = token_file.read_text().strip()
        except OSError as exc:
            err.print(f"error: cannot read --token-file {token_file}: {exc}", markup=False)
            raise typer.Exit(2) from None
        return value or None
    return os.environ.get("BIOENGINE_TOKEN", "").strip() or None


def _auth_headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _fail(message: str) -> NoReturn:
    """One line on stderr saying what failed, exit 1."""
    err.print(f"error: {message}", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(1)


def _pairs(option: str, items: list[str], names: list[str], model: str) -> dict[str, str]:
    """`NAME=FILE` or positional `FILE` arguments, matched to the model's tensor names."""
    pairs: dict[str, str] = {}
    for pos, item in enumerate(items):
        name, sep, path = item.partition("=")
        if not sep:
            if pos >= len(names):
                _fail(
                    f"{option} {item!r}: model '{model}' has {len(names)} "
                    f"{'input' if option == '--input' else 'output'}(s) ({', '.join(names)}); "
                    f"got {len(items)} {option} arguments"
                )
            name, path = names[pos], item
        elif name not in names:
            _fail(f"{option} {item!r}: model '{model}' has no tensor {name!r} ({', '.join(names)})")
        pairs[name] = path
    return pairs


def _read_array(path: str):
    """A .npy file as an array; exit 1 naming the file when it cannot be read."""
    import numpy as np

    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        _fail(f"--input {path}: no such file")
    except (OSError, ValueError) as exc:
        _fail(f"--input {path}: not a readable .npy file ({exc})")


def _gateway_url(url: str | None, config: Path | None) -> str:
    """--url, else the HTTP gateway of --config (as this host reaches it), else the default."""
    if url:
        return url.rstrip("/")
    if config:
        cfg = load(config)
        for backend in cfg.gateways.values():
            if backend.settings.kind == "http":
                s = backend.settings
                scheme = "https" if getattr(s, "tls_cert_file", None) else "http"
                return f"{scheme}://{url_host(connect_host(s.host))}:{s.port}"
    return "http://127.0.0.1:9000"


def infer(
    model: Annotated[
        str, typer.Option("--model", "-m", help="Model id, e.g. unet2d_nuclei_broad.")
    ],
    input: Annotated[
        list[str],
        typer.Option(
            "--input", "-i", help="Input .npy file, or NAME=FILE.npy (repeat for several inputs)."
        ),
    ],
    output: Annotated[
        list[str],
        typer.Option("--output", "-o", help="Where to write the output .npy, or NAME=FILE.npy."),
    ],
    url: Annotated[str | None, typer.Option(help="Gateway URL (default from --config).")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="site.toml")] = None,
    token_file: TokenFileOpt = None,
    cacert: CaOpt = None,
) -> None:
    """Send .npy files to a served model and save its outputs (uses a stock Triton client)."""
    import numpy as np
    import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    base = _gateway_url(url, config)
    headers = _auth_headers(_token(token_file))
    client = _triton_client(base, cacert)
    try:
        meta = client.get_model_metadata(model, headers=headers)
    except InferenceServerException as exc:
        _fail(f"{base} answered for model '{model}': {exc.message()}")
    except Exception as exc:  # connection refused, TLS, DNS
        _fail(f"cannot reach {base}: {exc}")
    in_names = [t["name"] for t in meta["inputs"]]
    out_names = [t["name"] for t in meta["outputs"]]
    arrays = {
        name: _read_array(path) for name, path in _pairs("--input", input, in_names, model).items()
    }
    targets = _pairs("--output", output, out_names, model)
    inputs = []
    for name, arr in arrays.items():
        x = tc.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        x.set_data_from_numpy(arr, binary_data=True)
        inputs.append(x)
    started = time.perf_counter()
    try:
        result = client.infer(
            model,
            inputs,
            outputs=[tc.InferRequestedOutput(n, binary_data=True) for n in targets],
            headers=headers,
        )
    except InferenceServerException as exc:
        _fail(f"{base} refused the request ({exc.status()}): {exc.message()}")
    except Exception as exc:
        _fail(f"connection to {base} failed during the request: {exc}")
    elapsed = time.perf_counter() - started
    for name, path in targets.items():
        arr = result.as_numpy(name)
        np.save(path, arr)
        console.print(f"{name}: {arr.shape} {arr.dtype} -> {path}", highlight=False)
    console.print(f"done in {elapsed * 1000:.1f} ms", highlight=False)


def _triton_client(base: str, cacert: Path | None):
    """A stock tritonclient HTTP client for the gateway at `base` (TLS with `cacert`)."""
    import tritonclient.http as tc

    tls: dict = {}
    if base.startswith("https://"):
        import gevent.ssl

        def context_factory():
            return gevent.ssl.create_default_context(cafile=str(cacert) if cacert else None)

        tls = {"ssl": True, "ssl_context_factory": context_factory}
    return tc.InferenceServerClient(
        base.split("://", 1)[1], network_timeout=300, connection_timeout=30, **tls
    )


def status(
    url: Annotated[str | None, typer.Option(help="Gateway URL (default from --config).")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="site.toml")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    wide: Annotated[
        bool, typer.Option("--wide", help="More columns (host, in flight), whole messages.")
    ] = False,
    token_file: TokenFileOpt = None,
    cacert: CaOpt = None,
) -> None:
    """Show what runs where: replicas, endpoints, states, models and request counts.

    Replica details (processes, endpoints, paths) need an admin token when the gateway has
    tokens; an inference token shows states and counts only.
    """
    base = _gateway_url(url, config)
    data = _fetch_status(base, _token(token_file), cacert)
    if data is None and config:
        path = load(config).state_dir / "status.json"
        if path.exists():
            data = json.loads(path.read_text())
            err.print(
                f"[yellow]gateway {base} not reachable; last recorded state from {path}[/yellow]",
                highlight=False,
            )
    if data is None:
        err.print(
            f"[red]no BioEngine answers at {base}[/red] (is `bioengine serve` running?)",
            highlight=False,
        )
        raise typer.Exit(1)
    if as_json:
        print(json.dumps(data, indent=1))
        return
    _render_status(data, wide)


def _fetch_status(base: str, token: str | None, cacert: Path | None) -> dict | None:
    """GET /bioengine/status; None when nothing answers; exit 1 when the call is refused."""
    context = ssl.create_default_context(cafile=str(cacert) if cacert else None)
    request = urllib.request.Request(f"{base}/bioengine/status", headers=_auth_headers(token))
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            try:
                reason = json.loads(exc.read()).get("error", "")
            except ValueError:
                reason = ""
            err.print(
                f"error: {base} refused the status call ({exc.code}): {reason}; pass "
                "--token-file or set BIOENGINE_TOKEN",
                markup=False,
            )
            raise typer.Exit(1) from None
        return None
    except (OSError, ValueError):
        return None


def human_duration(seconds: float) -> str:
    """`seconds` as an operator reads it: 45s, 3m 20s, 2h 05m, 3d 04h."""
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours:02d}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def _render_status(data: dict, wide: bool = False) -> None:
    """The status as tables: deployment line, replicas, models, gateways. Fits 80 columns
    (endpoints are never cut); `wide` adds host and in-flight columns."""
    uptime = data.get("uptime_s")
    console.print(
        f"deployment [bold]{data['deployment']}[/bold]: executor "
        f"{data['executor']}, storage {data['storage']['kind']} "
        f"({data['storage']['uri']}), {data['ready_replicas']}/"
        f"{data['target_replicas']} replicas ready"
        + (f", up {human_duration(uptime)}" if uptime is not None else ""),
        highlight=False,
    )
    table = Table(title="replicas")
    table.add_column("id", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("endpoint", no_wrap=True)
    if wide:
        table.add_column("host", no_wrap=True)
    table.add_column("requests", justify="right")
    if wide:
        table.add_column("in flight", justify="right")
    table.add_column("detail", overflow="fold")
    for r in data["replicas"]:
        detail = (r.get("message") or "").strip()
        if r.get("expires_at"):
            detail += f" expires in {human_duration(r['expires_at'] - time.time())}"
        if not wide:
            detail = detail.splitlines()[0][:120] if detail else ""
        row = [r["id"], r["state"], r.get("url") or "-"]
        if wide:
            row.append(r.get("host") or "-")
        row.append(str(r.get("requests", 0)))
        if wide:
            row.append(str(r.get("outstanding", 0)))
        row.append(detail.strip())
        table.add_row(*row)
    console.print(table)
    models = Table(title="models")
    for col in ("id", "weights", "backend", "requests", "errors"):
        models.add_column(col)
    for m in data["models"]:
        models.add_row(
            m["id"], m["weight_format"], m["backend"], str(m["requests"]), str(m["errors"])
        )
    console.print(models)
    if data.get("catalog"):
        _render_catalog(data["catalog"])
    if data.get("autoscale"):
        _render_autoscale(data["autoscale"])
    gws = Table(title="gateways")
    for col in ("name", "kind", "url", "state"):
        gws.add_column(col)
    for name, g in data.get("gateways", {}).items():
        gws.add_row(name, str(g.get("kind", "")), str(g.get("url", "")), str(g.get("state", "")))
    console.print(gws)


def _render_catalog(cat: dict) -> None:
    """Catalog mode: the budget, every model requested so far with its state, recent unloads."""
    budget = cat.get("max_loaded") or "no limit"
    console.print(
        f"catalog ({cat.get('source')}): {cat.get('loaded')} loaded (max_loaded {budget}), "
        f"{cat.get('offered')} in the collection"
        + (f"; listing: {cat['listing_error']}" if cat.get("listing_error") else ""),
        highlight=False,
    )
    table = Table(title="catalog models")
    for col in ("id", "state", "loads", "unloads", "idle", "detail"):
        table.add_column(col, overflow="fold" if col == "detail" else "ellipsis")
    for m in cat.get("models", []):
        idle = m.get("idle_s")
        table.add_row(
            m["id"],
            m["state"],
            str(m.get("loads", 0)),
            str(m.get("unloads", 0)),
            human_duration(idle) if idle is not None else "-",
            (m.get("reason") or "")[:200],
        )
    console.print(table)
    for line in cat.get("events", [])[-5:]:
        console.print(line, highlight=False, markup=False)


def _render_autoscale(auto: dict) -> None:
    """The autoscaler: limits, the load it sees, its last decisions with their reasons."""
    console.print(
        f"autoscale: target {auto.get('target')} (min {auto.get('min_replicas')}, max "
        f"{auto.get('max_replicas')}), load {auto.get('load')} requests in flight or waiting",
        highlight=False,
    )
    for d in auto.get("decisions", [])[-5:]:
        when = time.strftime("%H:%M:%S", time.localtime(d["at"])) if d.get("at") else "?"
        console.print(f"  {when} {d.get('reason', '')}", highlight=False, markup=False)
