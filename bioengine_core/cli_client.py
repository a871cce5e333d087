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
import urllib.parse
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


def _model_axes(
    base: str, model: str, headers: dict[str, str], cacert: Path | None
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The axes of the model's inputs and outputs as the deployment lists them ({} if unknown)."""
    query = urllib.parse.urlencode({"q": model, "limit": 1000})
    request = urllib.request.Request(f"{base}/bioengine/models?{query}", headers=headers)
    context = ssl.create_default_context(cafile=str(cacert) if cacert else None)
    try:
        with urllib.request.urlopen(request, timeout=30, context=context) as resp:
            rows = json.loads(resp.read())
    except (OSError, ValueError):
        return {}, {}
    for row in rows if isinstance(rows, list) else []:
        if row.get("id") == model:
            return (
                {t["id"]: list(t.get("axes", [])) for t in row.get("inputs", [])},
                {t["id"]: list(t.get("axes", [])) for t in row.get("outputs", [])},
            )
    return {}, {}


def _read_input(path: str, name: str, model: str, model_axes: list[str] | None, axes: str | None):
    """An input file as the array the model takes (an .npy of the right rank as it is)."""
    from .imagefiles import ImageFileError, map_axes, read_image

    try:
        arr, file_axes = read_image(path)
        if model_axes and not (file_axes is None and axes is None and arr.ndim == len(model_axes)):
            arr = map_axes(arr, axes or file_axes, model_axes, name=name, model=model)
    except ImageFileError as exc:
        _fail(f"--input {exc}")
    return arr


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
        typer.Option(
            "--output", "-o", help="Where to write the output (.npy or .tif), or NAME=FILE."
        ),
    ],
    axes: Annotated[
        str | None,
        typer.Option(
            help="The input file's axes when its metadata does not say them and the model "
            "could take it two ways, one letter per dimension: e.g. zyx (a z-stack), cyx "
            "(channels), yxc (an RGB image)."
        ),
    ] = None,
    url: Annotated[str | None, typer.Option(help="Gateway URL (default from --config).")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="site.toml")] = None,
    token_file: TokenFileOpt = None,
    cacert: CaOpt = None,
) -> None:
    """Send images to a served model and save its outputs (uses a stock Triton client).

    Inputs may be .npy arrays, TIFF (OME-TIFF, multi-page stacks) or PNG files; their axes are
    mapped onto the model's (a 2D image gets batch and channel axes of 1). Images of any size
    are tiled by the deployment. Outputs are written as .npy or .tif (with axes metadata).

    Example: bioengine infer -m unet2d_nuclei_broad -i cells.tif -o mask.tif --url http://127.0.0.1:9000
    """
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
    targets = _pairs("--output", output, out_names, model)
    in_axes, out_axes = _model_axes(base, model, headers, cacert)
    arrays = {}
    for name, path in _pairs("--input", input, in_names, model).items():
        arrays[name] = _read_input(path, name, model, in_axes.get(name), axes)
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
    from .imagefiles import ImageFileError, write_image

    for name, path in targets.items():
        arr = result.as_numpy(name)
        try:
            write_image(path, arr, out_axes.get(name) or [])
        except ImageFileError as exc:
            _fail(f"--output {exc}")
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
