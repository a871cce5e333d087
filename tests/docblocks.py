"""What the doc tests (tests/test_docs.py) need to read documentation and act on it.

Fenced blocks of Markdown with their doc-test markers, the command lines of shell blocks, site
configs built from TOML blocks (fragments merged over examples/local.toml, settings that name
files and environment variables satisfied with dummies), a scratch directory that stands for a
directory of the repository, and `bioengine serve` run in the background until it is ready.
The convention itself is described in tests/test_docs.py.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
BASE_CONFIG = ROOT / "examples" / "local.toml"
SHELL_LANGS = {"bash", "sh", "shell", "console"}
DUMMY_SECRET = "doc-test-dummy-value-0123456789abcdef"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_MARKER = re.compile(r"^<!--\s*doc-test:\s*(?P<kind>[\w-]+)\s*(?:[—–-]+\s*(?P<reason>.*?))?\s*-->$")
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


# ------------------------------------------------------------------------------- markers


@dataclass(frozen=True)
class Marker:
    """A `<!-- doc-test: KIND — REASON -->` line; `error` says what is wrong with a bad one."""

    kind: str | None  # "run", "not-runnable", or None when the line is not a marker
    reason: str = ""
    error: str = ""


def parse_marker(line: str) -> Marker:
    """The doc-test marker that `line` (the nearest non-blank line before a fence) holds."""
    text = line.strip()
    if "doc-test" not in text:
        return Marker(None)
    match = _MARKER.match(text)
    if not match:
        return Marker(None, error=f"malformed doc-test marker {text!r}")
    kind, reason = match["kind"], (match["reason"] or "").strip()
    if kind == "run":
        if reason:
            return Marker(None, error=f"a 'run' marker takes no reason: {text!r}")
        return Marker("run")
    if kind == "not-runnable":
        if not reason:
            return Marker(None, error=f"'not-runnable' needs a reason after a dash: {text!r}")
        return Marker("not-runnable", reason)
    return Marker(None, error=f"unknown doc-test marker {kind!r} in {text!r}")


# -------------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class Block:
    """One fenced block of a Markdown file."""

    path: Path  # the Markdown file
    line: int  # 1-based line of the opening fence
    lang: str  # first word of the info string, lower case ("" when none)
    text: str  # the content, with the fence's indentation removed
    marker_line: str  # the nearest non-blank line before the fence ("" at the top)

    @property
    def marker(self) -> Marker:
        return parse_marker(self.marker_line)

    @property
    def id(self) -> str:
        return f"{rel(self.path)}:{self.line}"


def rel(path: Path) -> str:
    """`path` relative to the repository root, in POSIX form."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def parse_blocks(text: str, path: Path) -> list[Block]:
    """Every fenced block (``` or ~~~, any indentation) of a Markdown text, in order.

    A block closes at a line holding only the same fence character, at least as many times;
    a longer fence can therefore hold shorter ones, which stay content. An unclosed block
    runs to the end of the file, as in CommonMark.
    """
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match or (match["fence"][0] == "`" and "`" in match["info"]):
            i += 1
            continue
        indent, fence, info = len(match["indent"]), match["fence"], match["info"].strip()
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines):
            stripped = lines[i].strip()
            if stripped and set(stripped) == {fence[0]} and len(stripped) >= len(fence):
                break
            body.append(_dedent(lines[i], indent))
            i += 1
        i += 1
        before = next((ln for ln in reversed(lines[:start]) if ln.strip()), "")
        lang = info.split()[0].lower() if info else ""
        text_ = "\n".join(body) + ("\n" if body else "")
        blocks.append(Block(path, start + 1, lang, text_, before.strip()))
    return blocks


def _dedent(line: str, indent: int) -> str:
    """`line` without up to `indent` leading whitespace characters."""
    n = 0
    while n < indent and n < len(line) and line[n] in " \t":
        n += 1
    return line[n:]


def fence_count(text: str, lang: str) -> int:
    """How many lines of `text` open a fence tagged `lang` (a cross-check of parse_blocks)."""
    pattern = re.compile(rf"^[ \t]*(`{{3,}}|~{{3,}})[ \t]*{re.escape(lang)}\b", re.M | re.I)
    return len(pattern.findall(text))


# ----------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class Command:
    line: int  # line in the Markdown file where the command starts
    text: str  # the command, continuations joined


def commands(block: Block) -> list[Command]:
    """The command lines of a shell block: comments and blank lines skipped, lines ending in
    a backslash joined with the next; in a `console` block that uses `$ ` prompts, only the
    prompted lines (the rest is output)."""
    lines = block.text.splitlines()
    prompted = block.lang == "console" and any(ln.lstrip().startswith("$ ") for ln in lines)
    found: list[Command] = []
    pending: list[str] = []
    pending_line = 0
    for offset, raw in enumerate(lines):
        number = block.line + 1 + offset
        line = raw.rstrip()
        if pending:
            pending.append(line.strip())
            if not line.endswith("\\"):
                found.append(Command(pending_line, _join(pending)))
                pending = []
            continue
        stripped = line.strip()
        if prompted:
            if not stripped.startswith("$ "):
                continue
            stripped = stripped[2:].strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending, pending_line = [stripped], number
            continue
        found.append(Command(number, stripped))
    if pending:
        found.append(Command(pending_line, _join(pending)))
    return found


def _join(parts: list[str]) -> str:
    return " ".join(p[:-1].rstrip() if p.endswith("\\") else p for p in parts).strip()


def is_serve(command: str) -> bool:
    """True for `bioengine serve ...` (after `NAME=value` assignments, any path to bioengine)."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:
        return False
    while words and _ASSIGNMENT.match(words[0]):
        words.pop(0)
    if not words or Path(words[0]).name != "bioengine":
        return False
    rest = [w for w in words[1:] if not w.startswith("-")]
    return bool(rest) and rest[0] == "serve"


# ------------------------------------------------------------------------ environments


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment commands run with: this process's, like CI, with `.venv/bin` first on
    PATH and without BioEngine overrides that would change what a doc's config means."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("BIOENGINE_") and ("__" in k or k in _DROPPED))
    }
    env.update(
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        CI="true",
        COLUMNS="100",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


_DROPPED = {"BIOENGINE_DISABLE_PLUGINS", "BIOENGINE_TOKEN"}


def mirror(directory: Path, into: Path) -> Path:
    """A directory under `into` that stands for `directory` (inside the repository): every
    entry of it and of each of its ancestors up to the root is a symlink to the real one, so
    a relative path resolves from the mirror as it does from `directory`, while a file written
    into the mirror itself stays out of the repository. `.git` and `.bioengine` are left out."""
    parts = directory.resolve().relative_to(ROOT).parts
    real, here = ROOT, into
    here.mkdir(parents=True, exist_ok=True)
    for depth in range(len(parts) + 1):
        descend = parts[depth] if depth < len(parts) else None
        for entry in real.iterdir():
            if entry.name in (descend, ".git", ".bioengine"):
                continue
            (here / entry.name).symlink_to(entry)
        if descend is None:
            return here
        real, here = real / descend, here / descend
        here.mkdir()
    return here


# ------------------------------------------------------------------------- site configs


@dataclass
class SiteFile:
    """A site config ready for `bioengine config check`: where it is and the environment
    (dummy values for the variables it names) to check it with."""

    path: Path
    env: dict[str, str] = field(default_factory=dict)


def is_fragment(text: str, data: dict[str, Any] | None) -> bool:
    """A block without an [executor] section is a fragment of a site config."""
    if data is not None:
        return "executor" not in data
    return not re.search(r"^\s*\[\s*executor\s*\]", text, re.M)


def base_config() -> dict[str, Any]:
    """examples/local.toml with its relative paths made absolute, so that it can be merged
    under a fragment written anywhere."""
    data = tomllib.loads(BASE_CONFIG.read_text())
    here = BASE_CONFIG.parent
    engine = data.get("engine", {})
    if "state_dir" in engine:
        engine["state_dir"] = str(_absolute(engine["state_dir"], here))
    storage = data.get("storage", {})
    if "path" in storage:
        storage["path"] = str(_absolute(storage["path"], here))
    for model in data.get("models", []):
        scheme, sep, rest = model["source"].partition(":")
        if sep and scheme in ("folder", "zip"):
            model["source"] = f"{scheme}:{_absolute(rest, here)}"
        elif not sep:
            model["source"] = str(_absolute(model["source"], here))
    return data


def _absolute(value: str, here: Path) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (here / path).resolve()


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged over `base`: tables key by key, except that a table whose `kind` differs
    from the base's replaces it; arrays (`[[models]]`) and values replace."""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        if isinstance(old, dict) and isinstance(value, dict):
            if "kind" in old and "kind" in value and old["kind"] != value["kind"]:
                out[key] = value
            else:
                out[key] = merge(old, value)
        else:
            out[key] = value
    return out


def satisfy_references(
    data: Any, config_dir: Path, scratch: Path, env: dict[str, str], key: str = ""
) -> bool:
    """Give every setting that names something outside the file what it names: an environment
    variable (`env`, `*_env`) a dummy value in `env`; a file (`file`, `*_file`) that is not
    readable here a readable dummy file in `scratch` (the setting is rewritten to its path).
    Returns True when a setting was rewritten."""
    changed = False
    if isinstance(data, dict):
        for name, value in list(data.items()):
            if isinstance(value, str) and (name == "env" or name.endswith("_env")):
                env[value] = DUMMY_SECRET
            elif isinstance(value, str) and (name == "file" or name.endswith("_file")):
                path = _absolute(value, config_dir)
                if not (path.is_file() and os.access(path, os.R_OK)):
                    dummy = scratch / f"dummy-{len(list(scratch.glob('dummy-*')))}-{path.name}"
                    dummy.write_text(DUMMY_SECRET + "\n")
                    data[name] = str(dummy)
                    changed = True
            else:
                changed |= satisfy_references(value, config_dir, scratch, env, f"{key}{name}.")
    elif isinstance(data, list):
        for item in data:
            changed |= satisfy_references(item, config_dir, scratch, env, key)
    return changed


def site_file(
    text: str, config_dir: Path, scratch: Path, name: str, *, whole: bool = False
) -> SiteFile:
    """A site config file for the TOML `text` as if it were a file in `config_dir` (so that
    its relative paths resolve from there): merged over examples/local.toml when it has no
    [executor], with dummies for what its settings name, written into a mirror of
    `config_dir` under `scratch`; never merged when `whole` (a site config file). Text that
    is not valid TOML is written as it is, for the CLI to report."""
    scratch.mkdir(parents=True, exist_ok=True)
    where = mirror(config_dir, scratch / "tree")
    env: dict[str, str] = {}
    try:
        data: dict[str, Any] | None = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        data = None
    if data is None:
        out = text
    else:
        fragment = not whole and is_fragment(text, data)
        if fragment:
            data = merge(base_config(), data)
        changed = satisfy_references(data, config_dir, scratch, env)
        out = dumps(data) if fragment or changed else text
    path = where / name
    path.write_text(out)
    return SiteFile(path, env)


# --------------------------------------------------------------------------- TOML writer


def dumps(data: dict[str, Any]) -> str:
    """TOML for what tomllib read from a site config (tables, arrays of tables, scalars,
    arrays, inline tables inside arrays); no datetimes."""
    return _table(data, ()).lstrip("\n")


def _table(data: dict[str, Any], prefix: tuple[str, ...]) -> str:
    lines: list[str] = []
    nested: list[tuple[str, Any]] = []
    for key, value in data.items():
        if _is_table(value):
            nested.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in nested:
        name = ".".join(_key(k) for k in (*prefix, key))
        if isinstance(value, dict):
            body = _table(value, (*prefix, key))
            header = not value or not all(_is_table(v) for v in value.values())
            out += (f"\n[{name}]\n" if header else "") + body
        else:
            for item in value:
                out += f"\n[[{name}]]\n" + _table(item, (*prefix, key))
    return out


def _is_table(value: Any) -> bool:
    """A table or an array of tables (written as [headers], not inline)."""
    if isinstance(value, dict):
        return True
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _key(key: str) -> str:
    return key if _BARE_KEY.match(key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


# -------------------------------------------------------------------------------- serve


class Background:
    """A command (`bioengine serve ...`) run with bash in the background, its own process
    group, output collected; `stop()` sends Ctrl-C (SIGINT), then SIGTERM, then SIGKILL."""

    def __init__(self, command: str, *, cwd: Path, env: dict[str, str]):
        self.command = command
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            ["bash", "-c", command],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> str | None:
        """None once `text` has been printed; otherwise why not (exited, or timed out)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output:
                return None
            if self.proc.poll() is not None:
                self._reader.join(timeout=5)
                if text in self.output:
                    return None
                return f"exited with status {self.proc.returncode} before printing {text!r}"
            time.sleep(0.2)
        return f"did not print {text!r} within {timeout:.0f} s"

    def stop(self, grace: float = 60) -> str | None:
        """Stop it as an operator would (Ctrl-C); None when it stopped on that, else why not."""
        problem = None
        for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                problem = problem or f"did not stop within {grace:.0f} s of Ctrl-C (SIGINT)"
        self._reader.join(timeout=5)
        if not problem and self.proc.returncode != 0:
            problem = f"exited with status {self.proc.returncode} after Ctrl-C (SIGINT)"
        return problem


__all__ = [
    "BASE_CONFIG",
    "BIN",
    "ROOT",
    "SHELL_LANGS",
    "Background",
    "Block",
    "Command",
    "Marker",
    "SiteFile",
    "base_config",
    "cli_env",
    "commands",
    "dumps",
    "fence_count",
    "is_fragment",
    "is_serve",
    "merge",
    "mirror",
    "parse_blocks",
    "parse_marker",
    "satisfy_references",
    "site_file",
]
