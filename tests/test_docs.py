"""The docs are tested: every site config in them validates, every command in them runs.

This docstring is the authoritative description of the convention for doc authors.

WHAT IS READ
  Markdown: docs/*.md, README.md, examples/README.md, plugins/*/README.md (fenced blocks, ```
  or ~~~, at any indentation). Site config files: every *.toml under examples/ and under
  plugins/*/examples/. Each block is its own test case, named FILE:LINE (the line of the
  opening fence), e.g. `test_toml_block[docs/slurm.md:120]`.

THE MARKER
  The nearest non-blank line before a fence may be one HTML comment (invisible when rendered):

      <!-- doc-test: run -->
      <!-- doc-test: not-runnable — REASON -->

  The reason is required (after an em dash, en dash or hyphen) and says why this block cannot
  run here: a real Kubernetes cluster, a package registry, placeholder values, ...

TOML BLOCKS (```toml) AND EXAMPLE FILES
  Each must pass the real `bioengine config check --offline --config FILE`, run through the CLI
  as an operator would. A block marked not-runnable is exempt from the check (it must still be
  valid TOML): use that for TOML that is not a site config (a pyproject.toml).
  - A block with an [executor] section is a whole site config. A block without one is a
    fragment, merged over examples/local.toml: tables key by key, a table whose `kind` differs
    replaces the base's, `[[models]]` replaces the base's models.
  - Relative paths in a block resolve from the directory of the Markdown file that holds it,
    as if the block were saved as a site.toml next to that file (docs/x.md: `../models/NAME`;
    README.md: `models/NAME`). The values taken from examples/local.toml are made absolute
    first. An example file's relative paths resolve from its own directory, as always.
  - The check is about the TOML, not this machine: every environment variable the config names
    (a setting `env` or `*_env`) is set to a dummy value, and every file it names (`file`,
    `*_file`) that is not readable here is replaced by a readable dummy file. Models, state
    directories and everything else are checked as they are: `folder:/shared/...` on a path
    that does not exist here fails (use `bundled:NAME` or mark the block not-runnable).
  - Example plugins under docs/examples/ are installed (into a temp dir, on PYTHONPATH) for
    the check, so a config using the plugin-authoring guide's `ssh` executor validates.
  A block that fails shows the CLI's output in the failure.

SHELL BLOCKS (```bash, ```sh, ```shell, ```console)
  Each needs a marker; an unmarked shell block fails.
  - `not-runnable — REASON`: not run; the reason must not be empty.
  - `run`: each command line runs with bash (`-o pipefail`) and must exit 0, within 120 s.
    Comment lines and blank lines are skipped; a line ending in `\\` continues on the next; in
    a ```console block with `$ ` prompts only the prompted lines run (the rest is output).
    Each line is its own shell: `cd` and `export` do not carry over (write `NAME=value cmd`).
    Lines run with PATH starting with the test's .venv/bin, CI=true and COLUMNS=100, in a
    scratch directory that mirrors the repository root (a symlink to every top-level entry but
    .git and .bioengine): paths read as from the root (`examples/local.toml`, `models/...`),
    and a file a command writes into its working directory (`--output out.npy`, `-o site.toml`)
    lands in the scratch directory and is deleted with it. Do not write through the links
    into the repository (`-o examples/x.toml`).
  - A line `bioengine serve ...` (also `.venv/bin/bioengine serve`) runs in the background
    until it prints "Stop with Ctrl-C" (within 120 s; it fails if serve exits first); the
    lines after it talk to it. At the end of the block every serve is stopped with Ctrl-C
    (SIGINT), then SIGTERM; a serve that does not stop on Ctrl-C fails the block. Prefer one
    serve per block (each costs a Triton start) and keep to the ports the config names.

ALSO CHECKED
  A deliberately broken config fails the checker (so these tests cannot pass vacuously), every
  ```toml fence of a file is collected, and the block parser handles markers, indentation,
  nested fences, prompts and continuations.
"""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
from core_helpers import triton_available
from docblocks import (
    BIN,
    ROOT,
    SHELL_LANGS,
    Background,
    Block,
    cli_env,
    commands,
    fence_count,
    is_serve,
    merge,
    mirror,
    parse_blocks,
    parse_marker,
    rel,
    site_file,
)

from bioengine_core.testing.pytest_plugin import require_service

LINE_TIMEOUT = 120
SERVE_READY_TIMEOUT = 120
CHECK_TIMEOUT = 120
MARKERS_HELP = (
    "put one of these on the line before the fence:\n"
    "  <!-- doc-test: run -->   (the test runs each line from the repository root)\n"
    "  <!-- doc-test: not-runnable — REASON -->   (say why it cannot run here)"
)


def doc_files() -> list[Path]:
    """The Markdown files the convention covers."""
    files = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
    files += [ROOT / "examples" / "README.md", *sorted((ROOT / "plugins").glob("*/README.md"))]
    return [f for f in files if f.is_file()]


def example_files() -> list[Path]:
    """The site config files the convention covers."""
    files = sorted((ROOT / "examples").rglob("*.toml"))
    return files + sorted((ROOT / "plugins").glob("*/examples/**/*.toml"))


def all_blocks() -> list[Block]:
    return [b for f in doc_files() for b in parse_blocks(f.read_text(), f)]


TOML_BLOCKS = [b for b in all_blocks() if b.lang == "toml"]
SHELL_BLOCKS = [b for b in all_blocks() if b.lang in SHELL_LANGS]


# ----------------------------------------------------------------------- config check


@pytest.fixture(scope="session")
def example_plugins(tmp_path_factory) -> Path:
    """The example plugin distributions of docs/examples/, really installed (pip --target,
    from a copy so the source tree gets no build files) into one temp dir."""
    target = tmp_path_factory.mktemp("doc-example-plugins")
    work = tmp_path_factory.mktemp("doc-example-build")
    for project in sorted((ROOT / "docs" / "examples").glob("*/pyproject.toml")):
        source = shutil.copytree(project.parent, work / project.parent.name)
        subprocess.run(
            [str(BIN / "python"), "-m", "pip", "install", "--quiet", "--no-deps"]
            + ["--no-build-isolation", "--target", str(target), str(source)],
            check=True,
            capture_output=True,
            cwd=work,
            timeout=300,
        )
    return target


def config_check(
    text: str,
    config_dir: Path,
    scratch: Path,
    plugins_path: Path,
    name: str = "site.toml",
    *,
    whole: bool = False,
) -> tuple[bool, str]:
    """Run `bioengine config check --offline` on `text` as a site config in `config_dir`
    (see the module docstring); (passed, what the CLI printed)."""
    site = site_file(text, config_dir, scratch, name, whole=whole)
    env = cli_env(site.env)
    env["PYTHONPATH"] = str(plugins_path) + (
        f":{env['PYTHONPATH']}" if env.get("PYTHONPATH") else ""
    )
    argv = [str(BIN / "bioengine"), "config", "check", "--offline", "--config", str(site.path)]
    done = subprocess.run(
        argv, capture_output=True, text=True, env=env, cwd=scratch, timeout=CHECK_TIMEOUT
    )
    output = f"$ bioengine config check --offline --config {site.path}\n"
    output += f"{done.stdout}{done.stderr}(exit status {done.returncode})\n--- checked:\n"
    output += site.path.read_text()
    return done.returncode == 0, output


@pytest.mark.parametrize("block", TOML_BLOCKS, ids=lambda b: b.id)
def test_toml_block(block: Block, tmp_path: Path, example_plugins: Path) -> None:
    """A ```toml block is a site config (or a fragment of one) that `config check` accepts."""
    marker = block.marker
    assert not marker.error, f"{block.id}: {marker.error}\n{MARKERS_HELP}"
    if marker.kind == "not-runnable":
        try:
            tomllib.loads(block.text)
        except tomllib.TOMLDecodeError as exc:
            pytest.fail(f"{block.id}: not valid TOML: {exc}", pytrace=False)
        return
    passed, output = config_check(block.text, block.path.parent, tmp_path, example_plugins)
    assert passed, f"{block.id}: this TOML block does not pass config check:\n{output}"


@pytest.mark.parametrize("path", example_files(), ids=rel)
def test_example_file(path: Path, tmp_path: Path, example_plugins: Path) -> None:
    """Every example site config passes `config check` as it is, where it is."""
    passed, output = config_check(
        path.read_text(), path.parent, tmp_path, example_plugins, name=path.name, whole=True
    )
    assert passed, f"{rel(path)} does not pass config check:\n{output}"


BROKEN = {
    "fragment": ('[engine]\nreplicas = "many"\n', "replicas"),
    "whole config": ('[executor]\nkind = "no-such-executor"\n', "no-such-executor"),
    "unknown key": ("[gateways.http]\nprot = 9000\n", "prot"),
    "not TOML": ("[engine\nname = 1\n", "engine"),
    "missing model": ('[[models]]\nsource = "folder:no/such/model"\n', "no/such/model"),
}


@pytest.mark.parametrize("case", BROKEN, ids=str)
def test_checker_rejects_a_broken_config(case: str, tmp_path: Path, example_plugins: Path):
    """The check these tests rely on fails on a broken block, naming what is wrong: a doc
    test cannot pass because the checker accepts anything."""
    text, named = BROKEN[case]
    passed, output = config_check(text, ROOT / "docs", tmp_path, example_plugins)
    assert not passed, f"a broken config passed the check:\n{output}"
    assert named in output.split("--- checked:")[0], output


def test_fragment_is_merged_over_local_toml(tmp_path: Path) -> None:
    """A fragment keeps local.toml's executor and models and gets dummies for what it names;
    relative paths of the base still resolve."""
    text = '[gateways.http]\nport = 9100\n[[gateways.http.tokens]]\nrole = "admin"\n'
    text += 'env = "DOC_TEST_TOKEN"\n[[gateways.http.tokens]]\nrole = "inference"\n'
    text += 'file = "/no/such/inference.token"\n'
    site = site_file(text, ROOT / "docs", tmp_path, "site.toml")
    data = tomllib.loads(site.path.read_text())
    assert data["executor"] == {"kind": "local", "mode": "process"}
    assert data["gateways"]["http"]["port"] == 9100
    assert data["gateways"]["http"]["host"] == "127.0.0.1"
    assert Path(data["models"][0]["source"].removeprefix("folder:")).is_dir()
    assert site.env == {"DOC_TEST_TOKEN": site.env["DOC_TEST_TOKEN"]}
    assert Path(data["gateways"]["http"]["tokens"][1]["file"]).is_file()
    assert merge({"storage": {"kind": "local", "path": "x"}}, {"storage": {"kind": "s3"}}) == {
        "storage": {"kind": "s3"}
    }


@pytest.mark.parametrize("path", doc_files(), ids=rel)
def test_every_toml_fence_is_collected(path: Path) -> None:
    """The parser finds every ```toml block a file has (none is silently left unchecked)."""
    text = path.read_text()
    expected = fence_count(text, "toml")
    found = [b for b in parse_blocks(text, path) if b.lang == "toml"]
    assert len(found) == expected, f"{rel(path)}: {expected} toml fences, {len(found)} parsed"
    if expected:
        assert [b for b in TOML_BLOCKS if b.path == path], f"{rel(path)}: no block collected"


# ------------------------------------------------------------------------ shell blocks


def run_block(block: Block, tmp_path: Path) -> str:
    """Run a `run` block as the module docstring says; "" when every line passed, else what
    failed (the command, its exit status and output, and any serve's output)."""
    lines = commands(block)
    if not lines:
        return f"{block.id}: a 'run' block without a command"
    if any(is_serve(c.text) for c in lines):
        require_service(triton_available(), "Triton (tritonserver from nvidia-pytriton)")
    scratch = mirror(ROOT, tmp_path / "root")
    env = cli_env()
    serves: list[Background] = []
    failure = ""
    try:
        for command in lines:
            where = f"{rel(block.path)}:{command.line}: $ {command.text}"
            if is_serve(command.text):
                serve = Background(command.text, cwd=scratch, env=env)
                serves.append(serve)
                problem = serve.wait_for("Stop with Ctrl-C", SERVE_READY_TIMEOUT)
                if problem:
                    failure = f"{where}\nserve {problem}; its output:\n{serve.output}"
                    break
                continue
            try:
                done = subprocess.run(
                    ["bash", "-o", "pipefail", "-c", command.text],
                    cwd=scratch,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=LINE_TIMEOUT,
                )
            except subprocess.TimeoutExpired as exc:
                failure = f"{where}\ndid not finish within {LINE_TIMEOUT} s\n{exc.output or ''}"
                break
            if done.returncode != 0:
                failure = (
                    f"{where}\nexit status {done.returncode}\n--- stdout:\n{done.stdout}"
                    f"--- stderr:\n{done.stderr}"
                )
                break
    finally:
        for serve in reversed(serves):
            problem = serve.stop()
            if problem and not failure:
                failure = f"{block.id}: serve {problem}; its output:\n{serve.output}"
            elif failure:
                failure += f"\n--- serve ({serve.command}) output:\n{serve.output[-4000:]}"
    return failure


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=lambda b: b.id)
def test_shell_block(block: Block, tmp_path: Path) -> None:
    """A shell block is marked; a `run` block's lines all exit 0 against the real services."""
    marker = block.marker
    assert not marker.error, f"{block.id}: {marker.error}\n{MARKERS_HELP}"
    assert marker.kind, f"{block.id}: this {block.lang} block has no doc-test marker;\n" + (
        MARKERS_HELP
    )
    if marker.kind == "not-runnable":
        assert marker.reason.strip(), f"{block.id}: a not-runnable block needs a reason"
        return
    failure = run_block(block, tmp_path)
    assert not failure, failure


def _block(text: str) -> Block:
    return Block(ROOT / "docs" / "meta.md", 10, "bash", text, "<!-- doc-test: run -->")


def test_a_failing_line_fails_its_block(tmp_path: Path) -> None:
    """A `run` block fails at its first failing line, naming it; files written by a line land
    in the scratch directory, not in the repository; a pipeline fails when any part fails."""
    text = "echo written > doc-test-out.txt\ntest -f doc-test-out.txt\ntest -d models\n"
    assert run_block(_block(text), tmp_path / "a") == ""
    assert not (ROOT / "doc-test-out.txt").exists()
    failure = run_block(_block("true\n# a comment\nexit 3\ntrue\n"), tmp_path / "b")
    assert "docs/meta.md:13: $ exit 3" in failure and "exit status 3" in failure
    assert "false | cat" in run_block(_block("false | cat\n"), tmp_path / "c")


def test_a_serve_that_fails_fails_its_block(tmp_path: Path) -> None:
    """A serve line that exits before it is ready fails the block with serve's own output."""
    failure = run_block(_block("bioengine serve --config no-such-site.toml\n"), tmp_path)
    assert "exited with status" in failure and "no-such-site.toml" in failure, failure


# ---------------------------------------------------------------- the parser itself

SAMPLE = """# Title

<!-- doc-test: run -->
```bash
bioengine config check \\
    --config examples/local.toml   # trailing comment
# a comment

bioengine plugins list
```

<!-- doc-test: not-runnable — needs a real cluster -->

~~~sh
kubectl get pods
~~~

- a list item:

  <!-- doc-test: run -->
  ```console
  $ bioengine status --url http://127.0.0.1:9000
  deployment local ...
  ```

````markdown
```bash
inside a longer fence: content, not a block
```
````

```bash
echo unmarked
```

<!-- doc-test: not-runnable -->
```sh
echo no reason
```

```toml title="x.toml"
[engine]
```
"""


def test_parser_reads_blocks_markers_and_commands() -> None:
    """Markers, tilde and indented fences, nested fences, prompts and continuations."""
    blocks = parse_blocks(SAMPLE, ROOT / "docs" / "sample.md")
    assert [(b.line, b.lang) for b in blocks] == [
        (4, "bash"),
        (14, "sh"),
        (21, "console"),
        (26, "markdown"),
        (32, "bash"),
        (37, "sh"),
        (41, "toml"),
    ]
    run, cluster, console, _, unmarked, no_reason, toml = blocks
    assert run.marker.kind == "run" and run.id == "docs/sample.md:4"
    assert [(c.line, c.text) for c in commands(run)] == [
        (5, "bioengine config check --config examples/local.toml   # trailing comment"),
        (9, "bioengine plugins list"),
    ]
    assert (cluster.marker.kind, cluster.marker.reason) == ("not-runnable", "needs a real cluster")
    assert console.marker.kind == "run"
    assert [c.text for c in commands(console)] == ["bioengine status --url http://127.0.0.1:9000"]
    assert unmarked.marker.kind is None and not unmarked.marker.error
    assert no_reason.marker.kind is None and "reason" in no_reason.marker.error
    assert toml.text == "[engine]\n"
    assert fence_count(SAMPLE, "toml") == 1


@pytest.mark.parametrize(
    ("line", "kind"),
    [
        ("<!-- doc-test: run -->", "run"),
        ("<!--doc-test:run-->", "run"),
        ("<!-- doc-test: not-runnable - placeholders -->", "not-runnable"),
        ("<!-- doc-test: not-runnable – a cluster -->", "not-runnable"),
        ("<!-- doc-test: maybe -->", None),
        ("<!-- a comment -->", None),
        ("Some text.", None),
    ],
)
def test_markers(line: str, kind: str | None) -> None:
    assert parse_marker(line).kind == kind


@pytest.mark.parametrize(
    ("command", "serve"),
    [
        ("bioengine serve --config examples/local.toml", True),
        (".venv/bin/bioengine serve --config site.toml", True),
        ("BIOENGINE_ENGINE__REPLICAS=2 bioengine -v serve --config x.toml", True),
        ("bioengine status --url http://127.0.0.1:9000", False),
        ("bioengine config check --config serve.toml", False),
        ("make serve", False),
    ],
)
def test_serve_lines(command: str, serve: bool) -> None:
    assert is_serve(command) is serve
