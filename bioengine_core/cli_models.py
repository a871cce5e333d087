"""`bioengine models`: the packages shipped with BioEngine, a site config to start from, and
`pull` to fill the model cache ahead of time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .cli_common import console, err
from .errors import BioEngineError, ModelError

models_app = typer.Typer(
    help="Models shipped with BioEngine, an example site config that serves them, and "
    "`pull` to fill the model cache ahead of time.",
    no_args_is_help=True,
)


@models_app.command("bundled")
def bundled(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List the model-zoo packages shipped inside BioEngine (use them as `bundled:NAME`)."""
    from .bundled import bundled_models

    models = bundled_models()
    if as_json:
        rows = [
            {"name": m.name, "source": f"bundled:{m.name}", "title": m.title,
             "weights": list(m.weights), "path": str(m.path)}
            for m in models
        ]  # fmt: skip
        print(json.dumps(rows, indent=1))
        return
    table = Table(title="Bundled models")
    for col in ("source", "name", "weights"):
        table.add_column(col)
    for m in models:
        table.add_row(f"bundled:{m.name}", m.title, ", ".join(m.weights))
    console.print(table)


@models_app.command("example")
def example(
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Where to write the config ('-' for stdout).")
    ] = Path("site.toml"),
    model: Annotated[
        list[str] | None,
        typer.Option("--model", "-m", help="A bundled model to serve (repeatable)."),
    ] = None,
    port: Annotated[int, typer.Option(help="Port of the HTTP gateway.")] = 9000,
    force: Annotated[bool, typer.Option(help="Overwrite an existing file.")] = False,
) -> None:
    """Write a site config that serves bundled models on this machine (local executor, Triton
    from the nvidia-pytriton wheel, HTTP gateway on 127.0.0.1), the first step after install.

    \b
      bioengine models example -o site.toml
      bioengine serve --config site.toml
    """
    from .bundled import example_config

    try:
        text = example_config(model or ["unet2d_nuclei_broad"], port=port, file=str(output))
    except ModelError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if str(output) == "-":
        print(text, end="")
        return
    if output.exists() and not force:
        err.print(
            f"error: {output} exists; choose another --output or pass --force to overwrite it",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    console.print(
        f"wrote {output}. Next:\n  bioengine config check --config {output}\n"
        f"  bioengine serve --config {output}",
        highlight=False,
        markup=False,
        soft_wrap=True,
    )


def _pull_source(cfg: object, ref: str) -> object:
    """The configured model source for `ref`'s scheme, with offline mode off (pull fetches)."""
    from .sources import split_ref

    scheme, _ = split_ref(ref)
    for name, backend in cfg.sources.items():  # type: ignore[attr-defined]
        if backend is None or scheme not in (getattr(backend.record, "schemes", ()) or (name,)):
            continue
        settings = backend.settings
        if "offline" in type(settings).model_fields:
            settings = settings.model_copy(update={"offline": False})
        context = cfg.context(progress=_say).for_backend("source", name)  # type: ignore[attr-defined]
        return backend.record.factory(settings=settings, context=context)
    raise ModelError(f"no model source handles '{scheme}:' (see `bioengine plugins list`)")


def _say(line: str) -> None:
    console.print(line, highlight=False, markup=False, soft_wrap=True)


@models_app.command("pull")
def pull(
    refs: Annotated[
        list[str],
        typer.Argument(
            help="Zoo ids (affable-shark, affable-shark/1.1) or references "
            "(bioimageio:ID, doi:10.5281/..., https://.../rdf.yaml)."
        ),
    ],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="Site config whose [sources.*] settings and cache to use."
        ),
    ] = None,
) -> None:
    """Fetch models into the verified cache ahead of time (e.g. before a site goes offline:
    then `offline = true` in [sources.bioimageio] serves them without network).

    \b
      bioengine models pull affable-shark --config site.toml
    """
    from .cli_common import load
    from .config import load_config

    try:
        cfg = load(config) if config else load_config(None, _plugins())
    except BioEngineError as exc:
        err.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    failed = 0
    for raw in refs:
        ref = raw if ":" in raw else f"bioimageio:{raw}"
        try:
            source = _pull_source(cfg, ref)
            folder = source.resolve(ref, cache_dir=cfg.state_dir / "sources")  # type: ignore[attr-defined]
        except BioEngineError as exc:
            failed += 1
            line = " ".join(str(exc).split())
            err.print(f"error: {line}", markup=False, highlight=False, soft_wrap=True)
            continue
        _say(f"{ref}: cached at {folder}")
    if failed:
        raise typer.Exit(1)


def _plugins() -> object:
    from .cli_common import plugins

    return plugins()


def _show(rows: list[dict], as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = Table(title=title)
    for col in ("id", "state", "name", "tags"):
        table.add_column(col, overflow="fold")
    for r in rows:
        state = r.get("state", "")
        if r.get("reason") and state == "failed":
            state += f": {r['reason'][:80]}"
        table.add_row(r["id"], state, r.get("name", ""), ", ".join(r.get("tags", [])[:6]))
    console.print(table)
    if not rows:
        err.print("no model matches", highlight=False)


def _search(query: str, url: str | None, config: Path | None, limit: int) -> list[dict]:
    """GET /bioengine/models?q=...; one-line error and exit 2 when the gateway cannot answer."""
    import urllib.error
    import urllib.parse
    import urllib.request

    from .cli_client import _auth_headers, _gateway_url, _token

    base = _gateway_url(url, config)
    query_string = urllib.parse.urlencode({"q": query, "limit": limit})
    request = urllib.request.Request(
        f"{base}/bioengine/models?{query_string}", headers=_auth_headers(_token(None))
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read()).get("error", "")
        except ValueError:
            reason = ""
        err.print(f"error: {base} answered {exc.code}: {reason}", markup=False)
    except (OSError, ValueError) as exc:
        err.print(f"error: no BioEngine answers at {base} ({exc})", markup=False)
    raise typer.Exit(2)


UrlOpt = Annotated[
    str | None, typer.Option(help="Gateway URL (default: the HTTP gateway of --config).")
]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="site.toml")]
LimitOpt = Annotated[int, typer.Option(min=1, max=1000, help="Most rows to show.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


@models_app.command("search")
def search(
    query: Annotated[list[str], typer.Argument(help="Words that must all appear.")],
    url: UrlOpt = None,
    config: ConfigOpt = None,
    limit: LimitOpt = 50,
    as_json: JsonOpt = False,
) -> None:
    """Find models a deployment offers by words in their id, name, description or tags; in
    catalog mode this covers the whole allowed collection, loaded or not (the state column).

    Example: bioengine models search nuclei segmentation --url http://127.0.0.1:9000
    """
    _show(_search(" ".join(query), url, config, limit), as_json, "models")


@models_app.command("list")
def list_models(
    url: UrlOpt = None, config: ConfigOpt = None, limit: LimitOpt = 1000, as_json: JsonOpt = False
) -> None:
    """List the models a deployment offers with their state (ready, available, loading,
    failed). Example: bioengine models list --config site.toml"""
    _show(_search("", url, config, limit), as_json, "models")
