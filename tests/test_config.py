"""Site config: validation errors name file, section and key; env overrides; secrets hidden."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from core_helpers import ROOT, run_cli

from bioengine_core.config import load_config
from bioengine_core.errors import ConfigError

EXAMPLE = ROOT / "examples" / "local.toml"


def write(tmp_path: Path, text: str, name: str = "site.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_example_local_passes_config_check():
    result = run_cli("config", "check", "--config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout and "executor 'local'" in result.stdout


@pytest.mark.parametrize(
    ("old", "new", "section", "key", "detail"),
    [
        ('mode = "process"', 'mdoe = "process"', "[executor]", "'mdoe'", "unknown key"),
        ("replicas = 1", 'replicas = "two"', "[engine]", "'replicas'", "'two'"),
        ('kind = "local"\nmode', 'kind = "lokal"\nmode', "[executor]", "'kind'", "'lokal'"),
        ("port = 9000", "port = 99999", "[gateways.http]", "'port'", "99999"),
    ],
    ids=["misspelt-key", "wrong-type", "unknown-kind", "out-of-range"],
)
def test_bad_copy_of_example_fails_naming_file_section_key(
    tmp_path, old, new, section, key, detail
):
    text = EXAMPLE.read_text()
    assert old in text
    bad = write(tmp_path, text.replace(old, new, 1))
    result = run_cli("config", "check", "--config", str(bad))
    assert result.returncode == 2
    message = result.stderr
    assert str(bad) in message and section in message and key in message and detail in message
    assert len(message.splitlines()) <= 25  # one screen
    assert "Traceback" not in message


def test_unknown_kind_lists_installed_and_known_distribution(tmp_path, monkeypatch):
    # the workspace installs the k8s executor: disable it to stand for "not installed"
    monkeypatch.setenv("BIOENGINE_DISABLE_PLUGINS", "executor_k8s")
    cfg = write(tmp_path, '[executor]\nkind = "k8s"\n')
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    text = str(info.value)
    assert "no executor named 'k8s'" in text
    assert "pip install bioengine-executor-k8s" in text


def test_unknown_section_is_rejected(tmp_path):
    cfg = write(tmp_path, "[enigne]\nreplicas = 2\n")
    with pytest.raises(ConfigError, match=r"unknown section \[enigne\]"):
        load_config(cfg)


def test_models_entry_errors_name_the_entry(tmp_path):
    cfg = write(tmp_path, '[[models]]\nsource = "folder:x"\n\n[[models]]\nsorce = "y"\n')
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert "[models #2]" in str(info.value) and "'sorce'" in str(info.value)


def test_environment_overrides_file_and_is_named_in_errors(tmp_path, monkeypatch):
    cfg = write(tmp_path, "[engine]\nreplicas = 1\n")
    monkeypatch.setenv("BIOENGINE_ENGINE__REPLICAS", "3")
    assert load_config(cfg).engine.replicas == 3
    monkeypatch.setenv("BIOENGINE_ENGINE__REPLICAS", "-1")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert "environment variable BIOENGINE_ENGINE__REPLICAS" in str(info.value)


def test_invalid_toml_names_file(tmp_path):
    cfg = write(tmp_path, "[engine\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(cfg)


def test_schema_includes_installed_backends():
    result = run_cli("config", "schema")
    assert result.returncode == 0, result.stderr
    schema = json.loads(result.stdout)
    kinds = [v["properties"]["kind"]["const"] for v in schema["properties"]["executor"]["oneOf"]]
    assert "local" in kinds
    gateways = schema["properties"]["gateways"]["additionalProperties"]["oneOf"]
    assert "http" in [v["properties"]["kind"]["const"] for v in gateways]


def test_secret_is_masked_in_config_check(tmp_path, thirdparty_site):
    # SecretStr fields are masked by `config check --show`; the hypha gateway's token is one,
    # but the core must not depend on a plugin: use a settings model with a secret in-process.
    from pydantic import SecretStr

    from bioengine_core.contracts import BackendSettings, GatewayType
    from bioengine_core.hookspecs import hookimpl
    from bioengine_core.plugins import PluginManager

    class SecretGatewaySettings(BackendSettings):
        kind: str = "secretgw"
        token: SecretStr

    class Plugin:
        @hookimpl
        def bioengine_register_gateways(self):
            return [GatewayType("secretgw", SecretGatewaySettings, lambda **kw: None)]

    pm = PluginManager(extra=[("secretgw", Plugin())])
    cfg = write(
        tmp_path,
        '[gateways.x]\nkind = "secretgw"\ntoken = "s3cr3t-value"\n[executor]\nkind = "local"\n',
    )
    config = load_config(cfg, pm)
    dumped = json.dumps(config.redacted())
    assert "s3cr3t-value" not in dumped and "**********" in dumped
    assert "s3cr3t-value" not in repr(config.gateways["x"].settings)


@pytest.mark.parametrize(
    "example",
    sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("plugins/*/examples/*.toml")),
)
def test_every_plugin_example_passes_config_check(example):
    """With the environment it names (dummy values), each example passes `config check`;
    without it, `config check` names every missing variable."""
    from bioengine_core.references import references

    config = load_config(ROOT / example)
    backends = [config.executor, config.storage, *config.gateways.values()]
    named = sorted(
        {value for b in backends for _, kind, value in references(b.settings, "") if kind == "env"}
    )
    env = {name: f"dummy-value-for-{name.lower()}-0123456789" for name in named}
    result = run_cli("config", "check", "--offline", "--config", example, env=env)
    assert result.returncode == 0, result.stderr
    if named:
        blank = {name: "" for name in named}
        result = run_cli("config", "check", "--offline", "--config", example, env=blank)
        assert result.returncode == 2
        for name in named:
            assert f"{name} is not set" in result.stderr, (name, result.stderr)


def test_model_source_scheme_must_be_installed(tmp_path):
    cfg = write(tmp_path, '[executor]\nkind = "local"\n\n[[models]]\nsource = "hub:some-model"\n')
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert "[models #1] key 'source'" in str(info.value) and "'hub:'" in str(info.value)
