"""The `bioengine` command line (typer + rich)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import BioEngineError, ConfigError, PluginError

console = Console()
err = Console(stderr=True)

HELP = """BioEngine serves BioImage Model Zoo models with NVIDIA Triton on your own infrastructure.

Typical use:

\b
  bioengine config check --config site.toml   # validate the whole config first
  bioengine serve --config site.toml          # build the repository, start replicas, serve
  bioengine status --config site.toml         # what runs where
  bioengine infer --model ID --input x.npy --output y.npy

Start from examples/local.toml (one workstation) and see docs/ for SLURM and Hypha.
"""

app = typer.Typer(
    help=HELP,
    no_args_is_help=True,
    rich_markup_mode=None,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
config_app = typer.Typer(
    help="Validate a site config or print its JSON schema.", no_args_is_help=True
)
plugins_app = typer.Typer(help="Inspect installed plugins.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(plugins_app, name="plugins")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Path to site.toml.")]
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


def _version(value: bool) -> None:
    if value:
        console.print(f"bioengine {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Show the version and exit."
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug details.")] = False,
) -> None:
    """BioEngine: self-hosted model serving for bioimage analysis."""
    logging.getLogger().setLevel(logging.DEBUG if verbose else logging.WARNING)


def _plugins():
    from .plugins import PluginManager

    try:
        return PluginManager()
    except PluginError as exc:
        err.print(f"[red]plugin error:[/red] {exc}")
        raise typer.Exit(2) from None


def _load(config: Path, plugins=None):
    from .config import load_config

    try:
        return load_config(config, plugins or _plugins())
    except ConfigError as exc:
        err.print(
            f"[red]invalid configuration[/red] ({len(exc.problems)} problem(s)):", highlight=False
        )
        for problem in exc.problems:
            err.print(f"  - {problem}", highlight=False, markup=False)
        raise typer.Exit(2) from None


# ------------------------------------------------------------------------- config
@config_app.command("check")
def config_check(
    config: ConfigOpt,
    show: Annotated[bool, typer.Option(help="Print the resolved config (secrets masked).")] = False,
) -> None:
    """Validate every section of a site config (exit 2 on the first screen of problems)."""
    cfg = _load(config)
    if show:
        console.print_json(json.dumps(cfg.redacted(), default=str))
    console.print(
        f"[green]ok[/green]: {config} — executor '{cfg.executor.settings.kind}', "
        f"storage '{cfg.storage.settings.kind}', gateways "
        f"{', '.join(cfg.gateways) or 'none'}, {len(cfg.models)} model(s)",
        highlight=False,
    )


@config_app.command("schema")
def config_schema_cmd() -> None:
    """Print the JSON schema of site.toml, including every installed plugin's sections."""
    from .config import config_schema

    print(json.dumps(config_schema(_plugins()), indent=2))


# ------------------------------------------------------------------------- plugins
@plugins_app.command("list")
def plugins_list(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show every backend with its family, distribution, version and status."""
    rows = _plugins().rows()
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table(title="BioEngine plugins")
    for col in ("name", "family", "plugin", "distribution", "version", "status"):
        table.add_column(col)
    for row in rows:
        status = (
            row["status"]
            if row["status"] == "ok"
            else f"[red]{row['status']}[/red]: {row['error']}"
        )
        table.add_row(
            row["name"], row["family"], row["plugin"], row["distribution"], row["version"], status
        )
    console.print(table)


# ------------------------------------------------------------------------- serve
@app.command()
def serve(
    config: ConfigOpt,
    replicas: Annotated[int | None, typer.Option(help="Override [engine] replicas.")] = None,
) -> None:
    """Build the model repository, start (or adopt) replicas, serve until Ctrl-C or SIGTERM.

    On shutdown the gateways stop accepting, in-flight requests finish and the replicas stop.
    """
    from .engine import Engine

    plugins = _plugins()
    cfg = _load(config, plugins)
    if replicas is not None:
        cfg.engine.replicas = replicas
    engine = Engine(cfg, plugins)
    engine.progress = lambda msg: err.print(
        f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}", highlight=False, soft_wrap=True
    )
    try:
        _run(_serve(engine))
    except BioEngineError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, markup=False)
        raise typer.Exit(1) from None


def _run(coro) -> None:
    """Run the serve loop on uvloop when it is installed (lower per-request latency)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(coro)
        return
    uvloop.run(coro)


async def _serve(engine) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(engine.start())
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({starting, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if starting in done and starting.exception() is None:
        _print_usage(engine)
        await waiter
    elif starting in done:
        waiter.cancel()
        await engine.stop()
        raise starting.exception()
    else:
        starting.cancel()
    err.print("shutting down: draining requests and stopping replicas ...")
    await engine.stop()
    err.print("stopped.")


def _print_usage(engine) -> None:
    """Tell the user, in copy-pastable lines, how to call what is now serving."""
    import shutil

    http = next(
        (g.info()["url"] for g in engine.gateways.values() if g.info().get("kind") == "http"), None
    )
    models = sorted(engine.models)
    exe = "bioengine" if shutil.which("bioengine") else os.path.relpath(sys.argv[0])
    lines = [
        f"BioEngine '{engine.config.engine.name}' is serving {len(models)} model(s): "
        f"{', '.join(models)}"
    ]
    for name, gateway in engine.gateways.items():
        info = gateway.info()
        lines.append(f"  gateway {name}: {info.get('url', '')} ({info.get('state', '')})")
    if http and models:
        m = models[0]
        sample = next(iter(engine.models[m].package.test_inputs.values()), None)
        example = os.path.relpath(sample) if sample else "INPUT.npy"
        lines += [
            "Call it:",
            f"  {exe} infer --url {http} --model {m} --input {example} --output out.npy",
            f"  {exe} status --url {http}",
            f"  curl {http}/health",
            '  python -c "import tritonclient.http as h; '
            f"c = h.InferenceServerClient('{http.split('://')[1]}'); "
            f"print(c.get_model_metadata('{m}'))\"",
        ]
    for name, backend in engine.config.gateways.items():
        if getattr(backend.settings, "exposed_anonymously", False):
            lines.append(
                f"WARNING: gateway {name} listens on {backend.settings.host} and accepts callers "
                "without a token (allow_anonymous = true): anyone on the network may run models."
            )
    lines.append("Stop with Ctrl-C.")
    print("\n".join(lines), flush=True)


# ------------------------------------------------------------------------- client side
def _gateway_url(url: str | None, config: Path | None) -> str:
    if url:
        return url.rstrip("/")
    if config:
        cfg = _load(config)
        for backend in cfg.gateways.values():
            if backend.settings.kind == "http":
                host = backend.settings.host
                return (
                    f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:"
                    f"{backend.settings.port}"
                )
    return "http://127.0.0.1:9000"


@app.command()
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
    secure = base.startswith("https://")
    tls: dict = {}
    if secure:
        import gevent.ssl

        def context_factory():
            return gevent.ssl.create_default_context(cafile=str(cacert) if cacert else None)

        tls = {"ssl": True, "ssl_context_factory": context_factory}
    client = tc.InferenceServerClient(
        base.split("://", 1)[1], network_timeout=300, connection_timeout=30, **tls
    )
    try:
        meta = client.get_model_metadata(model, headers=headers)
        in_names = [t["name"] for t in meta["inputs"]]
        out_names = [t["name"] for t in meta["outputs"]]
        arrays = {}
        for pos, item in enumerate(input):
            name, _, path = item.rpartition("=") if "=" in item else (in_names[pos], "", item)
            arrays[name] = np.load(path)
        inputs = []
        for name, arr in arrays.items():
            x = tc.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
            x.set_data_from_numpy(arr, binary_data=True)
            inputs.append(x)
        targets = {}
        for pos, item in enumerate(output):
            name, _, path = item.rpartition("=") if "=" in item else (out_names[pos], "", item)
            targets[name] = path
        started = time.perf_counter()
        result = client.infer(
            model,
            inputs,
            outputs=[tc.InferRequestedOutput(n, binary_data=True) for n in targets],
            headers=headers,
        )
        elapsed = time.perf_counter() - started
    except InferenceServerException as exc:
        err.print(f"[red]error:[/red] {exc.message()}", highlight=False, markup=False)
        raise typer.Exit(1) from None
    except Exception as exc:  # connection refused etc.
        err.print(f"[red]error:[/red] cannot reach {base}: {exc}", highlight=False)
        raise typer.Exit(1) from None
    for name, path in targets.items():
        arr = result.as_numpy(name)
        np.save(path, arr)
        console.print(f"{name}: {arr.shape} {arr.dtype} -> {path}", highlight=False)
    console.print(f"done in {elapsed * 1000:.1f} ms", highlight=False)


@app.command()
def status(
    url: Annotated[str | None, typer.Option(help="Gateway URL (default from --config).")] = None,
    config: Annotated[Path | None, typer.Option("--config", "-c", help="site.toml")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    token_file: TokenFileOpt = None,
    cacert: CaOpt = None,
) -> None:
    """Show what runs where: replicas, endpoints, states, models and request counts.

    Replica details (processes, endpoints, paths) need an admin token when the gateway has
    tokens; an inference token shows states and counts only.
    """
    import httpx

    base = _gateway_url(url, config)
    data = None
    try:
        resp = httpx.get(
            f"{base}/bioengine/status",
            timeout=10,
            headers=_auth_headers(_token(token_file)),
            verify=str(cacert) if cacert else True,
        )
        if resp.status_code in (401, 403):
            err.print(
                f"error: {base} refused the status call ({resp.status_code}): "
                f"{resp.json().get('error', '')}; pass --token-file or set BIOENGINE_TOKEN",
                markup=False,
            )
            raise typer.Exit(1)
        data = resp.json()
    except (httpx.HTTPError, ValueError):
        if config:
            cfg = _load(config)
            path = cfg.state_dir / "status.json"
            if path.exists():
                data = json.loads(path.read_text())
                err.print(
                    f"[yellow]gateway {base} not reachable; last recorded state "
                    f"from {path}[/yellow]",
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
    console.print(
        f"deployment [bold]{data['deployment']}[/bold]: executor "
        f"{data['executor']}, storage {data['storage']['kind']} "
        f"({data['storage']['uri']}), {data['ready_replicas']}/"
        f"{data['target_replicas']} replicas ready",
        highlight=False,
    )
    table = Table(title="replicas")
    for col in ("id", "state", "endpoint", "host", "requests", "in flight", "detail"):
        table.add_column(col)
    for r in data["replicas"]:
        detail = r.get("message") or ""
        if r.get("expires_at"):
            detail += f" expires in {max(0, r['expires_at'] - time.time()):.0f}s"
        table.add_row(
            r["id"],
            r["state"],
            r.get("url") or "-",
            r.get("host") or "-",
            str(r.get("requests", 0)),
            str(r.get("outstanding", 0)),
            detail.strip(),
        )
    console.print(table)
    models = Table(title="models")
    for col in ("id", "weights", "backend", "requests", "errors"):
        models.add_column(col)
    for m in data["models"]:
        models.add_row(
            m["id"], m["weight_format"], m["backend"], str(m["requests"]), str(m["errors"])
        )
    console.print(models)
    gws = Table(title="gateways")
    for col in ("name", "kind", "url", "state"):
        gws.add_column(col)
    for name, g in data.get("gateways", {}).items():
        gws.add_row(name, str(g.get("kind", "")), str(g.get("url", "")), str(g.get("state", "")))
    console.print(gws)


def main() -> None:
    """Entry point: logging first (before plugins import chatty libraries), plugin commands, run."""
    from . import logsafe

    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logsafe.install()
    try:
        from .plugins import PluginManager

        pm = PluginManager()
        pm.hook.bioengine_add_commands(app=app)
    except PluginError:
        pass  # reported by the command that needs plugins
    app(prog_name="bioengine")


if __name__ == "__main__":
    sys.exit(main())
