"""The `bioengine` command line (typer + rich)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from . import __version__
from .cli_client import infer, status
from .cli_common import ConfigOpt, console, err, load, plugins
from .cli_models import models_app
from .cli_modeltest import test
from .errors import BioEngineError

HELP = """BioEngine serves BioImage Model Zoo models with NVIDIA Triton on your own infrastructure.

Typical use:

\b
  bioengine config check --config site.toml   # validate the whole config first
  bioengine serve --config site.toml          # build the repository, start replicas, serve
  bioengine status --config site.toml         # what runs where
  bioengine infer --model ID --input x.npy --output y.npy
  bioengine test ID --config site.toml        # its test inputs, judged by its own tolerance

New here? `bioengine models example -o site.toml` writes a config serving a bundled model
on this machine. See docs/ for SLURM, S3, Kubernetes and Hypha.
"""

app = typer.Typer(
    help=HELP,
    no_args_is_help=True,
    rich_markup_mode=None,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command()(infer)
app.command()(status)
app.command()(test)
config_app = typer.Typer(
    help="Validate a site config or print its JSON schema.", no_args_is_help=True
)
plugins_app = typer.Typer(help="Inspect installed plugins.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(plugins_app, name="plugins")
app.add_typer(models_app, name="models")


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
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose",
            "-v",
            count=True,
            help="-v: BioEngine's debug log. -vv: the libraries' too (botocore, aiohttp, "
            "kubernetes: wire-level detail, very long).",
        ),
    ] = 0,
) -> None:
    """BioEngine: self-hosted model serving for bioimage analysis."""
    set_verbosity(verbose)


# Libraries whose debug log is wire-level detail (every HTTP header, signing steps, frames):
# shown only with -vv, so that -v stays readable and never prints request signatures.
WIRE_LOGGERS = (
    "botocore",
    "boto3",
    "s3transfer",
    "urllib3",
    "aiohttp",
    "asyncio",
    "websockets",
    "kubernetes",
    "hpack",
    "httpx",
    "httpcore",
    "sh",
)


def set_verbosity(level: int) -> None:
    """0: warnings only; 1: BioEngine's debug log; 2: every library's debug log as well."""
    logging.getLogger().setLevel(logging.DEBUG if level else logging.WARNING)
    for name in WIRE_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET if level >= 2 else logging.WARNING)


# ------------------------------------------------------------------------- config
@config_app.command("check")
def config_check(
    config: ConfigOpt,
    show: Annotated[bool, typer.Option(help="Print the resolved config (secrets masked).")] = False,
    offline: Annotated[
        bool,
        typer.Option(
            "--offline",
            help="Skip the checks that contact S3, SLURM, Kubernetes or Hypha "
            "(the file, its environment variables and files are still checked).",
        ),
    ] = False,
) -> None:
    """Check a site config as `serve` would before starting anything: every section, the
    environment variables and files it names, and (unless --offline) that each endpoint
    answers and can give what the config asks for. Exit 2 listing every problem."""
    cfg = load(config, references=True, preflight=True, offline=offline)
    if show:
        console.print_json(json.dumps(cfg.redacted(), default=str))
    console.print(
        f"[green]ok[/green]: {config} — executor '{cfg.executor.settings.kind}', "
        f"storage '{cfg.storage.settings.kind}', gateways "
        f"{', '.join(cfg.gateways) or 'none'}, {len(cfg.models)} model(s)"
        + (" (endpoints not contacted: --offline)" if offline else ""),
        highlight=False,
        soft_wrap=True,
    )


@config_app.command("schema")
def config_schema_cmd() -> None:
    """Print the JSON schema of site.toml, including every installed plugin's sections."""
    from .config import config_schema

    print(json.dumps(config_schema(plugins()), indent=2))


# ------------------------------------------------------------------------- plugins
@plugins_app.command("list")
def plugins_list(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show every backend with its family, distribution, version and status."""
    rows = plugins().rows()
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

    overrides = {"engine": {"replicas": replicas}} if replicas is not None else None
    cfg = load(config, overrides=overrides, references=True, preflight=True)
    engine = Engine(
        cfg,
        plugins(),
        progress=lambda msg: err.print(
            f"[dim]{time.strftime('%H:%M:%S')}[/dim] {escape(msg)}",
            highlight=False,
            soft_wrap=True,
        ),
    )
    try:
        _run(_serve(engine))
    except BioEngineError as exc:
        err.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except Exception as exc:  # a bug, not the operator's mistake: keep the traceback in a file
        import traceback

        crash = cfg.state_dir / "serve-crash.log"
        crash.parent.mkdir(parents=True, exist_ok=True)
        crash.write_text(traceback.format_exc())
        err.print(
            f"error: unexpected {type(exc).__name__}: {exc} — this is a BioEngine bug; "
            f"the traceback is in {crash} (please include it in a report)",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
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
def main() -> None:
    """Entry point: logging first (before plugins import chatty libraries), plugin commands, run."""
    from . import logsafe

    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logsafe.install()
    from .cli_common import _manager
    from .errors import PluginError

    try:
        _manager().hook.bioengine_add_commands(app=app)
    except PluginError:
        pass  # reported by the command that needs plugins
    app(prog_name="bioengine")


if __name__ == "__main__":
    sys.exit(main())
