"""`config check` asks the Hypha server named by server_url whether it is there (proxy mode),
and whether the embedded server can bind its port; each problem names the setting."""

from __future__ import annotations

import http.server
import socket
import threading
from pathlib import Path

from core_helpers import free_port, run_cli


def site(tmp_path: Path, gateway: str) -> str:
    path = tmp_path / "site.toml"
    path.write_text(
        f'[engine]\nname = "hp"\nstate_dir = "{tmp_path / "state"}"\n\n'
        f'[executor]\nkind = "local"\n\n[gateways.hypha]\nkind = "hypha"\n{gateway}\n'
    )
    return str(path)


def test_a_real_hypha_server_passes(hypha_server, tmp_path):
    ok = run_cli(
        "config", "check", "--config", site(tmp_path, f'server_url = "{hypha_server.url}"')
    )
    assert ok.returncode == 0, ok.stderr


def test_nothing_at_server_url_names_the_setting(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    path = site(tmp_path, f'server_url = "{url}"')
    bad = run_cli("config", "check", "--config", path)
    assert bad.returncode == 2
    assert f"no Hypha server answers at {url}" in bad.stderr
    assert f"check server_url = '{url}'" in bad.stderr
    assert "[gateways.hypha]" in bad.stderr and "Traceback" not in bad.stderr
    assert run_cli("config", "check", "--offline", "--config", path).returncode == 0


def test_a_web_server_that_is_not_hypha_is_told_apart(tmp_path):
    class Page(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            body = b"<html>a web page</html>"
            self.send_response(200 if self.path == "/" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        bad = run_cli("config", "check", "--config", site(tmp_path, f'server_url = "{url}"'))
        assert bad.returncode == 2
        assert "does not look like a Hypha server" in bad.stderr, bad.stderr
    finally:
        server.shutdown()


def test_an_embedded_port_in_use_is_named(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = site(tmp_path, f"embedded = true\nport = {port}\n")
        bad = run_cli("config", "check", "--offline", "--config", path)
        assert bad.returncode == 2
        assert f"cannot listen on 127.0.0.1:{port}" in bad.stderr
        assert "choose a free [gateways] port" in bad.stderr


def test_a_token_the_server_rejects_is_named_before_anything_starts(
    hypha_server, tmp_path, monkeypatch
):
    """A malformed (or expired, revoked) token is found by config check, not after Triton ran."""
    gateway = f'server_url = "{hypha_server.url}"\ntoken_env = "SITE_HYPHA_TOKEN"'
    path = site(tmp_path, gateway)
    bad = run_cli("config", "check", "--config", path, env={"SITE_HYPHA_TOKEN": "forged.tok.en"})
    assert bad.returncode == 2, bad.stderr
    assert f"the Hypha server at {hypha_server.url} refused the token (" in bad.stderr
    assert "put a valid token in environment variable SITE_HYPHA_TOKEN (token_env)" in bad.stderr
    assert "forged.tok.en" not in bad.stderr and "Traceback" not in bad.stderr
    offline = run_cli(
        "config", "check", "--offline", "--config", path, env={"SITE_HYPHA_TOKEN": "forged.tok.en"}
    )
    assert offline.returncode == 0, offline.stderr
    good = run_cli(
        "config", "check", "--config", path, env={"SITE_HYPHA_TOKEN": hypha_server.root_token}
    )
    assert good.returncode == 0, good.stderr


def test_a_token_file_the_server_rejects_names_the_file(hypha_server, tmp_path):
    (tmp_path / "hypha.token").write_text("forged.tok.en\n")
    path = site(tmp_path, f'server_url = "{hypha_server.url}"\ntoken_file = "hypha.token"')
    bad = run_cli("config", "check", "--config", path)
    assert bad.returncode == 2
    assert "put a valid token in file hypha.token (token_file)" in bad.stderr, bad.stderr


def test_embedded_mode_without_the_hypha_server_says_what_to_install(tmp_path):
    """As on a host where only the client was installed (`hypha` is not importable)."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['hypha'] = None\n")
    path = site(tmp_path, "embedded = true")
    bad = run_cli("config", "check", "--offline", "--config", path, env={"PYTHONPATH": str(hide)})
    assert bad.returncode == 2, bad.stderr
    assert "embedded = true needs the Hypha server" in bad.stderr
    assert "pip install 'bioengine-gateway-hypha[server]'" in bad.stderr
    assert run_cli("config", "check", "--offline", "--config", path).returncode == 0
