"""`bioengine test`: run a package's own test inputs through a deployment and judge the outputs
by the package's reproducibility tolerance (`bioengine_core.tolerance`).

The request is a stock Triton client request to the HTTP gateway, as any user sends it (the
connection, token and TLS helpers are `infer`'s, in `cli_client`). The deployment names the
description it serves and its weight format at `GET /bioengine/models/ID`; the test tensors come
from a local copy of the package (`--package`, a bundled package with that description, or the
zoo's copy of its id). Exit 0: passed; 1: an output is out of tolerance; 2: usage or connection.
"""

from __future__ import annotations

import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.table import Table

from .cli_client import CaOpt, TokenFileOpt, _auth_headers, _fail, _gateway_url, _token
from .cli_client import _triton_client as triton_client
from .cli_common import console, err, load, plugins


def _usage(message: str) -> NoReturn:
    """One line on stderr saying what is wrong with the call or the connection, exit 2."""
    err.print(f"error: {message}", highlight=False, markup=False, soft_wrap=True)
    raise typer.Exit(2)


def served_model(base: str, model: str, token: str | None, cacert: Path | None) -> dict:
    """`GET /bioengine/models/ID`: the id, weight format and description the deployment serves;
    exit 2 with the gateway's reason when it does not answer."""
    context = ssl.create_default_context(cafile=str(cacert) if cacert else None)
    quoted = urllib.parse.quote(model, safe="")
    request = urllib.request.Request(
        f"{base}/bioengine/models/{quoted}", headers=_auth_headers(token)
    )
    try:
        with urllib.request.urlopen(request, timeout=300, context=context) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        try:
            reason = json.loads(exc.read()).get("error", "")
        except (ValueError, AttributeError):
            reason = ""
        hint = "; pass --token-file or set BIOENGINE_TOKEN" if exc.code in (401, 403) else ""
        _usage(f"{base} answered {exc.code} for model '{model}': {reason}{hint}")
    except (OSError, ValueError) as exc:
        _usage(f"cannot reach {base}: {getattr(exc, 'reason', exc)}")


def _plain(rdf: Any) -> Any:
    """A description as JSON data (dates as text)."""
    return json.loads(json.dumps(rdf, default=str))


def _test_tensors(rdf: dict) -> list[tuple[str, str, str | None, str]]:
    """(inputs|outputs, tensor id, sha256 or None, file name) of each test tensor listed."""
    rows = []
    for kind in ("inputs", "outputs"):
        legacy = rdf.get(f"test_{kind}") or []  # format 0.4 lists them apart
        for i, t in enumerate(rdf.get(kind) or []):
            t = t if isinstance(t, dict) else {}
            test = t.get("test_tensor") or (legacy[i] if i < len(legacy) else {})
            test = test if isinstance(test, dict) else {"source": test}
            name = Path(str(test.get("source") or "")).name
            rows.append((kind, str(t.get("id") or t.get("name")), test.get("sha256"), name))
    return rows


def _declared(rdf: dict) -> Any:
    """The tolerance a description declares, as bioimageio.spec reads it."""
    from bioimageio.spec.model import v0_5

    config = (rdf.get("config") or {}).get("bioimageio") or {}
    entries = config.get("reproducibility_tolerance") or []
    try:
        entries = [v0_5.ReproducibilityTolerance.model_validate(e).model_dump() for e in entries]
    except ValueError:
        pass  # compared as written
    return _plain([entries, config.get("test_kwargs")])


def difference(served: Any, local: dict) -> str | None:
    """Why `local` is not the description the deployment serves (other test tensors or another
    declared tolerance), or None. Descriptions normalised by a cache still match."""
    if not isinstance(served, dict):
        return "the deployment sent no description"
    ours, theirs = _test_tensors(local), _test_tensors(served)
    if [r[:2] for r in ours] != [r[:2] for r in theirs]:
        return f"its tensors {[r[1] for r in ours]} are not the served {[r[1] for r in theirs]}"
    for (kind, tid, sha, name), (_, _, served_sha, served_name) in zip(ours, theirs, strict=True):
        if (sha != served_sha) if sha and served_sha else (name != served_name):
            return f"its test {kind[:-1]} '{tid}' is not the served one"
    if _declared(local) != _declared(served):
        return "it declares another reproducibility_tolerance"
    return None


def _bundled_match(description: Any) -> Path | None:
    """The folder of a bundled package that is the served description, if any."""
    import yaml

    from .bundled import bundled_models
    from .util import find_rdf

    for m in bundled_models():
        rdf = yaml.safe_load(find_rdf(m.path).read_text(encoding="utf-8")) or {}
        if _plain(rdf).get("name") == description.get("name") and not difference(description, rdf):
            return m.path
    return None


def local_package(ref: str | None, served: dict, config: Path | None) -> Any:
    """The package to take test tensors and tolerance from: `ref` (a folder, zip or reference),
    else a bundled package with the served description, else the zoo's copy of its `id`."""
    from .cli_models import _pull_source
    from .config import load_config
    from .errors import BioEngineError
    from .modelpkg import load_package

    description = _plain(served.get("description") or {})
    if not isinstance(description, dict):
        _usage(f"{served.get('id')}: the deployment sent no description")
    chosen = ref is not None
    if ref is None:
        match = _bundled_match(description)
        zoo_id = description.get("id")
        if match is None and not zoo_id:
            _usage(
                f"no local copy of model '{served.get('id')}' to take its test tensors from: "
                "pass --package PATH_OR_REF (its folder, zip:FILE, bioimageio:ID, ...)"
            )
        ref = str(match) if match is not None else f"bioimageio:{zoo_id}"
    elif Path(ref).exists():
        ref = str(Path(ref).resolve())  # relative to here, not to --config's folder
    try:
        cfg = load(config) if config else load_config(None, plugins())
        folder = _pull_source(cfg, ref).resolve(ref, cache_dir=cfg.state_dir / "sources")
        pkg = load_package(Path(folder))
    except BioEngineError as exc:
        _usage(f"package {ref}: {' '.join(str(exc).split())}")
    why = difference(description, _plain(pkg.rdf))
    if why:
        where = (
            f"{pkg.rdf_path} is not the package the deployment serves as '{served['id']}': {why}"
        )
        if not chosen:
            _usage(f"{where}; pass --package with the package it serves")
        err.print(
            f"warning: {where}; judging by the local package's test outputs and tolerance",
            highlight=False,
            markup=False,
            soft_wrap=True,
        )
    return pkg


def test(
    model: Annotated[str, typer.Argument(help="Model id as the deployment serves it.")],
    url: Annotated[str | None, typer.Option(help="Gateway URL (default from --config).")] = None,
    package: Annotated[
        str | None,
        typer.Option(
            "--package",
            "-p",
            help="Where to read the package (test tensors, tolerance): its folder, or a "
            "reference such as zip:FILE, bundled:NAME, bioimageio:ID. Default: the bundled "
            "package with the served description, else the zoo's copy of its id.",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="site.toml (its HTTP gateway and [sources.*])."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable report.")] = False,
    token_file: TokenFileOpt = None,
    cacert: CaOpt = None,
) -> None:
    """Run a model's own test inputs through a deployment (a stock Triton client request) and
    judge each output by the package's reproducibility tolerance.

    The tolerance is the package's config.bioimageio.reproducibility_tolerance entry for the
    output and for the weight format the deployment runs (bioimage.io's defaults when it
    declares none), applied as `bioimageio test` applies it. Exit 0: every output within
    tolerance; 1: an output is not, or the deployment refused the request; 2: a usage or
    connection error.

    \b
    Examples:
      bioengine test unet2d_nuclei_broad --url http://127.0.0.1:9000
      bioengine test my-model --url http://127.0.0.1:9000 --package ./my-model/
      bioengine test affable-shark --config site.toml --token-file ~/.bioengine-token
      bioengine test my-model --url http://127.0.0.1:9000 -p ./my-model/ --json
    """
    base = _gateway_url(url, config)
    token = _token(token_file)
    served = served_model(base, model, token, cacert)
    pkg = local_package(package, served, config)
    weight_format = served.get("weight_format") or pkg.weight_formats[0]
    outputs, elapsed = _run(base, model, pkg, token, cacert)
    report = judged(model, weight_format, pkg, outputs)
    report["execution_time"] = elapsed
    if as_json:
        print(json.dumps(report, indent=1))
    else:
        _render(report, pkg.root)
    raise typer.Exit(0 if report["passed"] else 1)


def _run(base: str, model: str, pkg: Any, token: str | None, cacert: Path | None):
    """The package's test inputs through the gateway: (outputs by id, seconds)."""
    import numpy as np
    import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    inputs = []
    for tid, path in pkg.test_inputs.items():
        arr = np.load(path, allow_pickle=False)
        x = tc.InferInput(tid, list(arr.shape), np_to_triton_dtype(arr.dtype))
        x.set_data_from_numpy(arr, binary_data=True)
        inputs.append(x)
    wanted = [tc.InferRequestedOutput(t, binary_data=True) for t in pkg.test_outputs]
    started = time.perf_counter()
    try:
        result = triton_client(base, cacert).infer(
            model, inputs, outputs=wanted, headers=_auth_headers(token)
        )
    except InferenceServerException as exc:
        _fail(f"{base} refused the test request for '{model}' ({exc.status()}): {exc.message()}")
    except Exception as exc:  # connection refused or reset, TLS
        _usage(f"connection to {base} failed during the request: {exc}")
    elapsed = time.perf_counter() - started
    return {tid: result.as_numpy(tid) for tid in pkg.test_outputs}, elapsed


def judged(model: str, weight_format: str, pkg: Any, outputs: dict) -> dict[str, Any]:
    """The report of a test: every test output of `pkg` judged under its tolerance."""
    import numpy as np

    from .tolerance import judge

    expected = {tid: np.load(path, allow_pickle=False) for tid, path in pkg.test_outputs.items()}
    reports = judge(pkg, outputs, expected, weight_format)
    return {
        "model_id": model,
        "weight_format": weight_format,
        "passed": all(r["passed"] for r in reports.values()),
        "outputs": reports,
    }


def _render(report: dict[str, Any], root: Path) -> None:
    """The verdict per output as a table, one line per failed output, then the verdict."""
    from .tolerance import summary_line

    console.print(
        f"model [bold]{report['model_id']}[/bold] ({report['weight_format']} weights), test "
        f"tensors of {root}: answered in {report['execution_time'] * 1000:.0f} ms",
        highlight=False,
    )
    table = Table(title="outputs")
    for col in ("output", "result", "mismatched", "per million", "max abs", "max rel"):
        table.add_column(col, justify="left" if col in ("output", "result") else "right")
    table.add_column("tolerance", overflow="fold")
    for tid, r in report["outputs"].items():
        tol = r["tolerance"]
        bounds = (
            f"rtol {tol['relative_tolerance']:g}, atol {tol['absolute_tolerance']:g} "
            f"({tol['source']})"
        )
        allowed = f" (max {tol['mismatched_elements_per_million']:g})"
        verdict = "[green]pass[/green]" if r["passed"] else "[red]FAIL[/red]"
        if "error" in r:
            table.add_row(tid, verdict, r["error"], "", "", "", bounds)
            continue
        table.add_row(
            tid,
            verdict,
            f"{r['mismatched_elements']} of {r['elements']}",
            f"{r['mismatched_per_million']:.1f}{allowed}",
            f"{r['max_abs_error']:.3g}",
            f"{r['max_rel_error']:.3g}",
            bounds,
        )
    console.print(table)
    for tid, r in report["outputs"].items():
        if not r["passed"]:
            err.print(summary_line(tid, r), highlight=False, markup=False, soft_wrap=True)
    verdict = "[green]passed[/green]" if report["passed"] else "[red]FAILED[/red]"
    console.print(f"{report['model_id']}: {verdict}", highlight=False)


__all__ = ["judged", "local_package", "served_model", "test"]
