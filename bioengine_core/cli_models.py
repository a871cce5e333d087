"""`bioengine models`: the packages shipped with BioEngine, and a site config to start from."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from .cli_common import console, err
from .errors import ModelError

models_app = typer.Typer(
    help="Models shipped with BioEngine, and an example site config that serves them.",
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
