"""Plugin discovery: built-ins, entry points, third-party packages, disabling, broken plugins."""

from __future__ import annotations

import json
import textwrap

import pytest
from core_helpers import run_cli

from bioengine_core.config import load_config
from bioengine_core.contracts import BackendSettings, ExecutorType
from bioengine_core.errors import ConfigError, PluginError
from bioengine_core.hookspecs import hookimpl
from bioengine_core.plugins import PluginManager


def listed(env=None) -> list[dict]:
    result = run_cli("plugins", "list", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_plugins_list_shows_builtins_and_workspace_plugins_with_versions():
    rows = {(r["family"], r["name"]): r for r in listed()}
    assert rows[("storage", "local")]["distribution"] == "bioengine"
    assert rows[("gateway", "http")]["plugin"] == "builtin"
    for family, name, dist in [
        ("executor", "local", "bioengine-executor-local"),
        ("executor", "slurm", "bioengine-executor-slurm"),
        ("gateway", "hypha", "bioengine-gateway-hypha"),
    ]:
        row = rows[(family, name)]
        assert row["distribution"] == dist and row["status"] == "ok"
        assert row["version"]


def test_plugins_list_table_is_readable():
    result = run_cli("plugins", "list")
    assert result.returncode == 0
    assert "bioengine-executor-local" in result.stdout and "version" in result.stdout


def test_thirdparty_plugin_discovered_and_selected_by_kind(thirdparty_site, tmp_path):
    env = {"PYTHONPATH": str(thirdparty_site)}
    rows = {(r["family"], r["name"]): r for r in listed(env)}
    echo = rows[("executor", "echo")]
    assert echo["distribution"] == "bioengine-executor-echo" and echo["version"] == "0.3.1"
    cfg = tmp_path / "site.toml"
    cfg.write_text('[executor]\nkind = "echo"\ngreeting = "hi"\n')
    ok = run_cli("config", "check", "--config", str(cfg), "--show", env=env)
    assert ok.returncode == 0, ok.stderr
    assert '"greeting": "hi"' in ok.stdout
    cfg.write_text('[executor]\nkind = "echo"\ngreting = "hi"\n')
    bad = run_cli("config", "check", "--config", str(cfg), env=env)
    assert bad.returncode == 2 and "'greting'" in bad.stderr and "greeting" in bad.stderr


def test_disable_plugins_removes_from_list_and_resolution(thirdparty_site, tmp_path):
    env = {"PYTHONPATH": str(thirdparty_site), "BIOENGINE_DISABLE_PLUGINS": "executor_echo"}
    names = {(r["family"], r["name"]) for r in listed(env)}
    assert ("executor", "echo") not in names and ("executor", "local") in names
    cfg = tmp_path / "site.toml"
    cfg.write_text('[executor]\nkind = "echo"\n')
    bad = run_cli("config", "check", "--config", str(cfg), env=env)
    assert bad.returncode == 2 and "no executor named 'echo'" in bad.stderr


def test_broken_plugin_is_skipped_with_warning_and_listed(tmp_path):
    site = tmp_path / "site"
    (site / "broken_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "broken_plugin-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: broken-plugin\nVersion: 1.0\n"
    )
    (site / "broken_plugin-1.0.dist-info" / "entry_points.txt").write_text(
        "[bioengine]\nbroken = broken_plugin_mod\n"
    )
    (site / "broken_plugin_mod.py").write_text("import does_not_exist_anywhere\n")
    env = {"PYTHONPATH": str(site)}
    result = run_cli("plugins", "list", "--json", env=env)
    assert result.returncode == 0
    rows = [r for r in json.loads(result.stdout) if r["name"] == "broken"]
    assert rows and rows[0]["status"] == "broken"
    assert "does_not_exist_anywhere" in rows[0]["error"]
    assert "failed to load" in result.stderr
    # the rest keeps working
    assert any(r["name"] == "local" for r in json.loads(result.stdout))


def test_two_backends_with_one_name_is_an_error_naming_both():
    class Settings(BackendSettings):
        kind: str = "local"

    class Clash:
        @hookimpl
        def bioengine_register_storages(self):
            return [
                __import__("bioengine_core.contracts").contracts.StorageType(
                    "local", Settings, lambda **kw: None
                )
            ]

    with pytest.raises(PluginError) as info:
        PluginManager(load_entry_points=False, extra=[("clash", Clash())])
    assert "'local'" in str(info.value) and "bioengine" in str(info.value)
    assert "clash" in str(info.value)


def test_inprocess_plugin_selected_by_kind(tmp_path):
    class Settings(BackendSettings):
        kind: str = "noop"
        depth: int = 1

    class Plugin:
        @hookimpl
        def bioengine_register_executors(self):
            return [ExecutorType("noop", Settings, lambda **kw: None)]

    pm = PluginManager(load_entry_points=False, extra=[("noop", Plugin())])
    cfg = tmp_path / "s.toml"
    cfg.write_text(
        textwrap.dedent("""
        [executor]
        kind = "noop"
        depth = 4
    """)
    )
    config = load_config(cfg, pm)
    assert config.executor.settings.depth == 4
    cfg.write_text('[executor]\nkind = "noop"\ndepth = "deep"\n')
    with pytest.raises(ConfigError, match=r"\[executor\] key 'depth' = 'deep'"):
        load_config(cfg, pm)


def test_version_flag():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("bioengine ")
