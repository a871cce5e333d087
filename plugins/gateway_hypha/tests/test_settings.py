"""`[gateways.hypha]` as an operator writes it: validation, secrets kept out of every dump."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from bioengine_gateway_hypha.gateway import HyphaGateway
from bioengine_gateway_hypha.settings import HyphaGatewaySettings

from bioengine_core.config import load_config
from bioengine_core.errors import ConfigError

SECRET = "hypha-token-that-must-never-be-shown-0123456789"


def site(tmp_path: Path, section: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(f'[executor]\nkind = "local"\n\n[gateways.hypha]\nkind = "hypha"\n{section}')
    return path


def test_plugin_registers_kind_hypha():
    from bioengine_core.plugins import PluginManager

    registered = PluginManager().get("gateway", "hypha")
    assert registered is not None
    assert registered.record.settings is HyphaGatewaySettings
    assert registered.plugin.distribution == "bioengine-gateway-hypha"


def test_config_check_shows_no_token(tmp_path, monkeypatch):
    monkeypatch.setenv("SITE_HYPHA_TOKEN", SECRET)
    (tmp_path / "admin.secret").write_text(SECRET + "-admin\n")
    path = site(
        tmp_path,
        'server_url = "https://hypha.example.org"\nworkspace = "my-lab"\n'
        'token_env = "SITE_HYPHA_TOKEN"\nadmin_token_file = "admin.secret"\n'
        'admin_users = ["alice@example.org"]\nvisibility = "protected"\n',
    )
    config = load_config(path)
    dumped = repr(config.redacted())
    assert "SITE_HYPHA_TOKEN" in dumped and "my-lab" in dumped
    assert SECRET not in dumped
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "bioengine"),
            "config",
            "check",
            "--offline",  # hypha.example.org is not reachable here; preflight is tested apart
            "--config",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**__import__("os").environ, "SITE_HYPHA_TOKEN": SECRET},
    )
    assert SECRET not in result.stdout + result.stderr
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("", r"set server_url \(proxy mode\) or embedded = true"),
        ('embedded = true\nserver_url = "http://x"\n', "not both"),
        ('embedded = true\nserver_args = ["--start-minio-server"]\n', "MinIO"),
        ('embedded = true\ntoken_env = "A"\ntoken_file = "b"\n', "token_env or token_file"),
        ('embedded = true\nvisibility = "everyone"\n', "visibility"),
        ('embedded = true\ntoken = "inline"\n', "token"),
    ],
)
def test_bad_sections_are_reported(tmp_path, section, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(site(tmp_path, section))
    assert "gateways.hypha" in str(err.value)


async def test_missing_token_variable_is_a_clear_error(backend_context, toy_service, monkeypatch):
    monkeypatch.delenv("NOT_SET_HYPHA_TOKEN", raising=False)
    gw = HyphaGateway(
        HyphaGatewaySettings(server_url="http://127.0.0.1:9", token_env="NOT_SET_HYPHA_TOKEN"),
        backend_context,
    )
    with pytest.raises(ConfigError, match="NOT_SET_HYPHA_TOKEN is not set"):
        await gw.start(toy_service)


def test_websocket_compression_switch_is_per_context():
    from bioengine_gateway_hypha.wsopts import websocket_compression
    from hypha_rpc.websocket_client import WebsocketRPCConnection

    conn = WebsocketRPCConnection("ws://127.0.0.1:9/ws", "probe")
    with websocket_compression(False):
        assert conn._ws_connect_kwargs()["compression"] is None
        with websocket_compression(True):
            assert "compression" not in conn._ws_connect_kwargs()
    assert "compression" not in conn._ws_connect_kwargs()  # other clients keep the default


def test_every_setting_is_in_the_operator_guide():
    guide = (Path(__file__).resolve().parents[3] / "docs" / "hypha.md").read_text()
    table = guide.split("## Settings reference", 1)[1].split("\n## ", 1)[0]
    missing = [
        name
        for name in HyphaGatewaySettings.model_fields
        if name != "kind" and f"`{name}`" not in table
    ]
    assert missing == [], f"settings missing from docs/hypha.md's settings reference: {missing}"


def test_embedded_server_environment_is_an_allow_list(tmp_path, monkeypatch):
    from bioengine_gateway_hypha.server import EmbeddedHyphaServer

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("HYPHA_TOKEN", SECRET)  # named by token_env: withheld despite HYPHA_*
    monkeypatch.setenv("SITE_ADMIN_SECRET", SECRET)
    monkeypatch.setenv("HYPHA_PUBLIC_BASE_URL", "https://example.org")  # an operator's option
    monkeypatch.setenv("HYPHA_ROOT_TOKEN", "operator-value-is-replaced")
    server = EmbeddedHyphaServer(
        log_path=tmp_path / "log", withhold_env=["HYPHA_TOKEN", "SITE_ADMIN_SECRET"]
    )
    env = server.environment()
    assert SECRET not in env.values()
    assert env["HYPHA_PUBLIC_BASE_URL"] == "https://example.org"
    assert env["HYPHA_ROOT_TOKEN"] == server.root_token
    assert env["BIOENGINE_HYPHA_WS_DEFLATE"] == "false"
    assert env["PATH"]
