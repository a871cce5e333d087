"""The plugin author guide stays true: every hook documented, its code identical to the example,
and the example plugin installs, is discovered, configures and passes the conformance suite.

Set BIOENGINE_UPDATE_GUIDE=1 to copy the example's files into the guide's code blocks.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from core_helpers import ROOT, run_cli

from bioengine_core import hookspecs
from bioengine_core.errors import BioEngineError
from bioengine_core.testing.pytest_plugin import require_service
from bioengine_core.triton import find_triton

GUIDE = ROOT / "docs" / "plugin-authoring.md"
EXAMPLE = ROOT / "docs" / "examples" / "bioengine-executor-ssh"
SSHD_DIR = Path(os.environ.get("BIOENGINE_SSHD_DIR", "/tmp/bioengine-sshd"))
SSHD_PORT = int(os.environ.get("BIOENGINE_SSHD_PORT", "2222"))

HEADING = re.compile(r"^(#{2,4}) `(bioengine_\w+)\(([^)]*)\)`\s*$", re.M)
FILE_BLOCK = re.compile(r'^(```\w* title="([^"]+)")\n(.*?)^```$', re.M | re.S)
KEY_FILES = {
    "docs/examples/bioengine-executor-ssh/pyproject.toml",
    "docs/examples/bioengine-executor-ssh/bioengine_executor_ssh/plugin.py",
    "docs/examples/bioengine-executor-ssh/bioengine_executor_ssh/settings.py",
    "docs/examples/bioengine-executor-ssh/bioengine_executor_ssh/executor.py",
    "docs/examples/bioengine-executor-ssh/bioengine_executor_ssh/remote.py",
    "docs/examples/bioengine-executor-ssh/tests/test_conformance.py",
}


def hookspec_arguments() -> dict[str, list[str]]:
    """Every hook declared in bioengine_core.hookspecs with its argument names, in order."""
    return {
        name: list(inspect.signature(func).parameters)
        for name, func in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("bioengine_")
    }


def guide_sections(text: str) -> dict[str, tuple[list[str], str]]:
    """Hook sections of the guide: name -> (arguments in the heading, section text)."""
    found = list(HEADING.finditer(text))
    sections = {}
    for match in found:
        level = len(match.group(1))
        end = len(text)
        for later in re.finditer(r"^(#{1,6}) ", text[match.end() :], re.M):
            if len(later.group(1)) <= level:
                end = match.end() + later.start()
                break
        args = [a.strip() for a in match.group(3).split(",") if a.strip()]
        sections[match.group(2)] = (args, text[match.end() : end])
    return sections


def sync_file_blocks(text: str) -> str:
    """The guide with every `title="FILE"` code block replaced by FILE's current content."""
    return FILE_BLOCK.sub(lambda m: f"{m[1]}\n{(ROOT / m[2]).read_text()}```", text)


if os.environ.get("BIOENGINE_UPDATE_GUIDE") == "1":  # maintenance switch, see module docstring
    GUIDE.write_text(sync_file_blocks(GUIDE.read_text()))


# ------------------------------------------------------------------------ the guide's text


def test_every_hook_and_argument_is_documented() -> None:
    """Each hookspec has a section `bioengine_x(args)` that describes every argument."""
    specs = hookspec_arguments()
    assert specs, "no hooks found in bioengine_core.hookspecs"
    sections = guide_sections(GUIDE.read_text())
    missing = sorted(set(specs) - set(sections))
    assert not missing, f"hooks not documented in {GUIDE.name}: {missing}"
    stale = sorted(set(sections) - set(specs))
    assert not stale, f"{GUIDE.name} documents hooks that do not exist: {stale}"
    for name, args in specs.items():
        heading_args, body = sections[name]
        assert heading_args == args, (
            f"{GUIDE.name}: heading of {name} lists {heading_args}, the hookspec has {args}"
        )
        for arg in args:
            assert f"`{arg}`" in body, f"{GUIDE.name}: argument `{arg}` of {name} is not described"
        for part in ("**When:**", "**Arguments:**", "**Returns:**"):
            assert part in body, f"{GUIDE.name}: section {name} lacks {part}"


def test_guide_code_blocks_match_example_files() -> None:
    """Code blocks titled with a file path are that file, byte for byte."""
    text = GUIDE.read_text()
    blocks = FILE_BLOCK.findall(text)
    titled = {path for _, path, _ in blocks}
    assert KEY_FILES <= titled, f"the guide does not show {sorted(KEY_FILES - titled)}"
    for _, path, body in blocks:
        source = ROOT / path
        assert source.is_file(), f"{GUIDE.name} shows {path}, which does not exist"
        assert body == source.read_text(), (
            f"{GUIDE.name}: the code block of {path} differs from the file; "
            "rerun with BIOENGINE_UPDATE_GUIDE=1 to copy the file into the guide"
        )


def test_guide_names_the_core_contracts() -> None:
    """The guide covers the records, contracts, helpers, errors and test suites by name."""
    from bioengine_core import contracts, errors, util

    text = GUIDE.read_text()
    names = [
        "ExecutorType",
        "StorageType",
        "ModelSourceType",
        "GatewayType",
        "BackendSettings",
        "SecretStr",
        "manages_replicas",
        "expires_at",
        "triton_backends",
        "run_command",
        "ExecutorConformance",
        "StorageConformance",
        "require_service",
        "BIOENGINE_DISABLE_PLUGINS",
    ]
    names += ["backend_dir", "start_process", "allow_env", "load_site", "unsatisfiable"]
    names += list(util.__all__)
    for cls in (
        contracts.Executor,
        contracts.Storage,
        contracts.ModelSource,
        contracts.Gateway,
        contracts.Service,
    ):
        names += [n for n, f in vars(cls).items() if callable(f) and not n.startswith("_")]
    names += [n for n, c in vars(errors).items() if isinstance(c, type) and n.endswith("Error")]
    absent = sorted({n for n in names if f"{n}" not in text})
    assert not absent, f"{GUIDE.name} does not mention {absent}"


# ------------------------------------------------------------------------ the example, for real


@pytest.fixture(scope="module")
def ssh_site(tmp_path_factory) -> Path:
    """The example distribution really installed (pip --target) into a temp dir."""
    target = tmp_path_factory.mktemp("ssh-site")
    src = tmp_path_factory.mktemp("ssh-src") / "bioengine-executor-ssh"
    # Build from a copy so that setuptools' build/ and egg-info never land in docs/.
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation"]
        + ["--target", str(target), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return target


def test_example_plugin_is_discovered(ssh_site: Path) -> None:
    """Once installed, `bioengine plugins list` shows the ssh executor from its distribution."""
    proc = run_cli("plugins", "list", "--json", env={"PYTHONPATH": str(ssh_site)})
    assert proc.returncode == 0, proc.stderr
    rows = [r for r in json.loads(proc.stdout) if r["name"] == "ssh"]
    assert rows, f"no backend named ssh in {proc.stdout}"
    row = rows[0]
    assert row["family"] == "executor"
    assert row["plugin"] == "executor_ssh"
    assert row["distribution"] == "bioengine-executor-ssh"
    assert row["version"] == "0.1.0"
    assert row["status"] == "ok", row["error"]

    env = {"PYTHONPATH": str(ssh_site), "BIOENGINE_DISABLE_PLUGINS": "executor_ssh"}
    proc = run_cli("plugins", "list", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert not [r for r in json.loads(proc.stdout) if r["name"] == "ssh"]


def test_example_plugin_config_checks(ssh_site: Path, tmp_path: Path) -> None:
    """A config with `[executor] kind = "ssh"` passes `config check`; a misspelt key fails."""
    site = tmp_path / "site.toml"
    site.write_text(
        "[engine]\n"
        'name = "guide"\n'
        'state_dir = "state"\n'
        "\n[executor]\n"
        'kind = "ssh"\n'
        'host = "127.0.0.1"\n'
        'user = "root"\n'
        f"port = {SSHD_PORT}\n"
        'identity_file = "keys/id_ed25519"\n'
        'ssh_options = ["StrictHostKeyChecking=accept-new"]\n'
        "\n[storage]\n"
        'kind = "local"\n'
    )
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "id_ed25519").write_text("a key file; config check only reads it\n")
    env = {"PYTHONPATH": str(ssh_site)}
    proc = run_cli("config", "check", "--config", str(site), "--show", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "executor 'ssh'" in proc.stdout
    assert '"identity_file": "keys/id_ed25519"' in proc.stdout

    site.write_text(site.read_text().replace('host = "127.0.0.1"', 'hots = "127.0.0.1"'))
    proc = run_cli("config", "check", "--config", str(site), env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "[executor] key 'hots'" in proc.stderr
    assert "[executor] key 'host': required key is missing" in proc.stderr


def sshd_answers() -> bool:
    """True when the sshd of .ci/start-sshd.sh accepts the client key as root."""
    key = SSHD_DIR / "client_key"
    if not key.is_file() or shutil.which("ssh") is None:
        return False
    options = ["BatchMode=yes", "ConnectTimeout=5", "StrictHostKeyChecking=no"]
    options += ["UserKnownHostsFile=/dev/null", "LogLevel=ERROR"]
    cmd = ["ssh", "-i", str(key), "-p", str(SSHD_PORT)]
    cmd += [arg for opt in options for arg in ("-o", opt)] + ["root@127.0.0.1", "true"]
    try:
        return subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def test_example_passes_executor_conformance(ssh_site: Path, tmp_path: Path) -> None:
    """The example's own conformance tests pass against the real sshd and a real Triton."""
    require_service(sshd_answers(), f"sshd on 127.0.0.1:{SSHD_PORT} (run .ci/start-sshd.sh)")
    try:
        find_triton()
    except BioEngineError as exc:
        require_service(False, f"tritonserver ({exc})")
    env = {
        **os.environ,
        "PYTHONPATH": str(ssh_site),
        "BIOENGINE_SSH_PORT": str(SSHD_PORT),
        "BIOENGINE_SSH_KEY": str(SSHD_DIR / "client_key"),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(EXAMPLE / "tests"), "-q", "-p", "no:cacheprovider"]
        + ["--rootdir", str(EXAMPLE), "--basetemp", str(tmp_path / "inner")],
        capture_output=True,
        text=True,
        cwd=ssh_site,
        env=env,
        timeout=400,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = proc.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 11, summary
    assert "skipped" not in summary and "failed" not in summary, summary
    leftover = [
        p.info["cmdline"]
        for p in psutil.process_iter(["cmdline"])
        if any(str(tmp_path / "inner") in arg for arg in p.info["cmdline"] or [])
    ]
    assert not leftover, f"replicas left running after the conformance tests: {leftover}"
