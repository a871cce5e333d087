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
