"""What an operator sees before and while serving when S3 refuses: `config check` contacts the
bucket (unless --offline) and names the cause and the setting that fixes it."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from core_helpers import free_port, run_cli

pytestmark = pytest.mark.s3


def site(tmp_path: Path, server, prefix: str, **storage: str) -> Path:
    """A site config using the real server, credentials from named variables."""
    values = {
        "endpoint_url": server.endpoint,
        "bucket": server.bucket,
        "prefix": prefix,
        "access_key_id_env": "SITE_S3_KEY",
        "secret_access_key_env": "SITE_S3_SECRET",
        **storage,
    }
    body = "".join(f'{k} = "{v}"\n' for k, v in values.items())
    path = tmp_path / "site.toml"
    path.write_text(
        f'[engine]\nname = "pf"\nstate_dir = "state"\n\n[storage]\nkind = "s3"\n{body}'
        '\n[[models]]\nsource = "bundled:tiny_affine"\n'
    )
    return path


@pytest.fixture
def creds(seaweed) -> dict[str, str]:
    """The server's credentials in the variables the site config names."""
    return {"SITE_S3_KEY": seaweed.access_key, "SITE_S3_SECRET": seaweed.secret_key}


def test_good_credentials_pass_and_a_wrong_secret_names_the_variables(
    seaweed, prefix, tmp_path, creds
):
    path = site(tmp_path, seaweed, prefix)
    ok = run_cli("config", "check", "--config", str(path), env=creds)
    assert ok.returncode == 0, ok.stderr

    wrong = {**creds, "SITE_S3_SECRET": "not-the-secret"}
    bad = run_cli("config", "check", "--config", str(path), env=wrong)
    assert bad.returncode == 2, bad.stdout
    line = next(x for x in bad.stderr.splitlines() if "[storage]" in x)
    assert "SignatureDoesNotMatch" in line and "credentials refused" in line
    assert "SITE_S3_KEY and SITE_S3_SECRET" in line
    assert "access_key_id_env / secret_access_key_env" in line
    unknown = run_cli(
        "config", "check", "--config", str(path), env={**wrong, "SITE_S3_KEY": "nobody"}
    )
    assert unknown.returncode == 2
    assert "InvalidAccessKeyId" in unknown.stderr and "credentials refused" in unknown.stderr
    assert "access_key_id_env / secret_access_key_env" in bad.stderr
    assert "not-the-secret" not in bad.stderr and "Traceback" not in bad.stderr
    offline = run_cli("config", "check", "--offline", "--config", str(path), env=wrong)
    assert offline.returncode == 0, offline.stderr

    # serve checks the same before starting anything
    served = run_cli("serve", "--config", str(path), env=wrong, timeout=60)
    assert served.returncode == 2 and "SITE_S3_KEY and SITE_S3_SECRET" in served.stderr
    assert not (tmp_path / "state").exists()


def test_a_missing_bucket_is_named_with_the_fix(seaweed, prefix, tmp_path, creds):
    path = site(tmp_path, seaweed, prefix, bucket=f"absent-{prefix}")
    bad = run_cli("config", "check", "--config", str(path), env=creds)
    assert bad.returncode == 2
    line = next(x for x in bad.stderr.splitlines() if "[storage]" in x)
    assert f"bucket 'absent-{prefix}' does not exist at {seaweed.endpoint}" in line
    assert f"aws s3 mb s3://absent-{prefix} --endpoint-url {seaweed.endpoint}" in line
    assert "create_bucket = true" in line and "fix [storage] bucket" in line
    assert "Traceback" not in bad.stderr
    offline = run_cli("config", "check", "--offline", "--config", str(path), env=creds)
    assert offline.returncode == 0, offline.stderr

    # with create_bucket, serve will create it: not a problem
    creating = site(tmp_path, seaweed, prefix, bucket=f"absent-{prefix}")
    creating.write_text(
        creating.read_text().replace('kind = "s3"\n', 'kind = "s3"\ncreate_bucket = true\n')
    )
    ok = run_cli("config", "check", "--config", str(creating), env=creds)
    assert ok.returncode == 0, ok.stderr


def test_a_key_the_bucket_policy_refuses_writes_fails_serve_in_one_line(
    seaweed, seaweed_reader, prefix, tmp_path
):
    """A key that may list but not write passes the (read-only) preflight; the publish then
    fails as one `error:` line naming the credential settings and the bucket policy."""
    admin = seaweed.client()
    try:
        admin.head_bucket(Bucket=seaweed.bucket)
    except Exception:
        admin.create_bucket(Bucket=seaweed.bucket)
    finally:
        admin.close()
    path = site(tmp_path, seaweed, prefix)
    reader = {"SITE_S3_KEY": seaweed_reader[0], "SITE_S3_SECRET": seaweed_reader[1]}
    checked = run_cli("config", "check", "--config", str(path), env=reader)
    assert checked.returncode == 0, checked.stderr
    served = run_cli("serve", "--config", str(path), env=reader, timeout=120)
    assert served.returncode != 0
    assert "Traceback" not in served.stderr + served.stdout
    errors = [x for x in served.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1, served.stderr
    assert "AccessDenied" in errors[0] and "PutObject" in errors[0]
    assert "SITE_S3_KEY and SITE_S3_SECRET" in errors[0] and "bucket policy" in errors[0]
    assert seaweed_reader[1] not in served.stderr + served.stdout
    seaweed.empty(prefix)


def test_no_server_at_the_endpoint_names_endpoint_url(seaweed, prefix, tmp_path, creds):
    endpoint = f"http://127.0.0.1:{free_port()}"
    path = site(tmp_path, seaweed, prefix, endpoint_url=endpoint)
    bad = run_cli("config", "check", "--config", str(path), env=creds, timeout=60)
    assert bad.returncode == 2
    line = next(x for x in bad.stderr.splitlines() if "[storage]" in x)
    assert f"no S3 server answers at {endpoint}" in line and "[storage] endpoint_url" in line
    offline = run_cli("config", "check", "--offline", "--config", str(path), env=creds)
    assert offline.returncode == 0, offline.stderr


class PlainServer:
    """A real HTTP server on a free port that answers every request with `status` and no body
    (or, with status 0, accepts connections and never answers); counts what reaches it."""

    def __init__(self, status: int):
        import socket
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.requests = 0
        self.connections = 0
        outer = self

        class Answer(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                outer.requests += 1
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _answer

            def log_message(self, *args) -> None:
                pass

        if status:
            self._http = ThreadingHTTPServer(("127.0.0.1", 0), Answer)
            port = self._http.server_address[1]
            threading.Thread(target=self._http.serve_forever, daemon=True).start()
        else:
            self._http = None
            self._sock = socket.create_server(("127.0.0.1", 0))
            self._held: list[socket.socket] = []
            port = self._sock.getsockname()[1]
            threading.Thread(target=self._hold, daemon=True).start()
        self.url = f"http://127.0.0.1:{port}"

    def _hold(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self.connections += 1
            self._held.append(conn)

    def close(self) -> None:
        """Stop serving."""
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        else:
            self._sock.close()
            for conn in self._held:
                conn.close()


@pytest.fixture
def plain_server():
    """`plain_server(status)`: a PlainServer, closed after the test."""
    made: list[PlainServer] = []

    def make(status: int) -> PlainServer:
        made.append(PlainServer(status))
        return made[-1]

    yield make
    for server in made:
        server.close()


@pytest.fixture
def web_server(plain_server) -> str:
    """A web server answering 404 to everything, as a web page, an S3 console or SeaweedFS's
    master port does: what an operator reaches with the wrong port."""
    return plain_server(404).url


def test_an_endpoint_that_is_not_s3_is_named_not_taken_for_a_missing_bucket(
    seaweed, web_server, prefix, tmp_path, creds, make_storage
):
    """A 404 without S3's error code (the wrong port) names endpoint_url, not the bucket; with
    create_bucket too, and serve's storage never tries to create a bucket there."""
    from bioengine_storage_s3 import S3StorageError

    path = site(tmp_path, seaweed, prefix, endpoint_url=web_server)
    for create in (False, True):
        if create:
            path.write_text(
                path.read_text().replace('kind = "s3"\n', 'kind = "s3"\ncreate_bucket = true\n')
            )
        bad = run_cli("config", "check", "--config", str(path), env=creds)
        assert bad.returncode == 2, bad.stdout
        line = next(x for x in bad.stderr.splitlines() if "[storage]" in x)
        assert f"the server at {web_server} answers HTTP 404 without an S3 error code" in line
        assert "not an S3 API" in line and "[storage] endpoint_url" in line
        assert "does not exist" not in line and "create it" not in line

    storage = make_storage(seaweed, prefix, endpoint_url=web_server, create_bucket=True)
    sent: list[str] = []
    storage.client.meta.events.register(
        "before-call.s3", lambda model, **_: sent.append(model.name)
    )
    with pytest.raises(S3StorageError, match="not an S3 API"):
        storage.list()
    assert "CreateBucket" not in sent, sent


def test_a_server_that_never_answers_is_tried_once_with_a_short_timeout(
    seaweed, plain_server, prefix, tmp_path, creds
):
    """The check gives up after one try (no retry storm) and names endpoint_url."""
    silent = plain_server(0)
    path = site(tmp_path, seaweed, prefix, endpoint_url=silent.url)
    bad = run_cli("config", "check", "--config", str(path), env=creds, timeout=60)
    assert bad.returncode == 2, bad.stdout
    line = next(x for x in bad.stderr.splitlines() if "[storage]" in x)
    assert f"the S3 server at {silent.url} accepted the connection but did not answer" in line
    assert "[storage] endpoint_url" in line
    assert silent.connections == 1


def test_max_attempts_is_the_number_of_requests_and_5xx_names_the_server(
    seaweed, plain_server, prefix, make_storage
):
    """`max_attempts = 3`: three requests, not three retries; then one line blaming the server."""
    from bioengine_storage_s3 import S3StorageError

    failing = plain_server(503)
    storage = make_storage(seaweed, prefix, endpoint_url=failing.url, max_attempts=3)
    with pytest.raises(S3StorageError) as failed:
        storage.list()
    assert f"the S3 server at {failing.url} failed on its side" in str(failed.value)
    assert failing.requests == 3


def test_the_example_passes_online_against_the_test_server(seaweed):
    """plugins/storage_s3/examples/s3.toml as docs/s3.md runs it: config check contacts the
    bucket (the example has create_bucket = true, so a missing bucket is fine)."""
    from core_helpers import ROOT

    env = {
        "SITE_S3_ACCESS_KEY": seaweed.access_key,
        "SITE_S3_SECRET_KEY": seaweed.secret_key,
        "BIOENGINE_STORAGE__ENDPOINT_URL": seaweed.endpoint,  # BIOENGINE_S3_PORT may move it
    }
    example = ROOT / "plugins" / "storage_s3" / "examples" / "s3.toml"
    ok = run_cli("config", "check", "--config", str(example), env=env)
    assert ok.returncode == 0, ok.stderr
    wrong = run_cli(
        "config", "check", "--config", str(example), env={**env, "SITE_S3_SECRET_KEY": "x"}
    )
    assert wrong.returncode == 2 and "SITE_S3_ACCESS_KEY and SITE_S3_SECRET_KEY" in wrong.stderr


def test_debug_log_of_a_publish_is_short_and_carries_no_credentials(
    seaweed, make_storage, prefix, write_model, tmp_path, caplog
):
    """`bioengine -v serve`: BioEngine's debug log, not botocore's wire log with key ids."""
    from bioengine_core.cli import set_verbosity

    storage = make_storage(seaweed, prefix)
    src = write_model(tmp_path / "src", {"config.pbtxt": b'name: "m"\n', "1/w.bin": b"x" * 999})
    try:
        set_verbosity(1)
        with caplog.at_level(logging.DEBUG):
            storage.put("m", src)
    finally:
        set_verbosity(0)
    text = caplog.text
    assert seaweed.access_key not in text and seaweed.secret_key not in text
    assert len(text.splitlines()) < 100, text[:2000]
    assert "published m" in text  # the publish summary is there


def free_block(count: int) -> int:
    """The first of `count` consecutive TCP ports that are all free on 127.0.0.1 now."""
    import random
    import socket

    for _ in range(200):
        base = random.randrange(30000, 50000)
        try:
            for port in range(base, base + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no {count} consecutive free ports in 30000-50000")


def test_start_script_takes_its_ports_from_the_environment(tmp_path):
    """`.ci/start-s3.sh` on other ports (a second server beside the shared one), then stopped."""
    import shutil
    import subprocess
    import urllib.error
    import urllib.request

    from core_helpers import ROOT

    script = ROOT / ".ci" / "start-s3.sh"
    from bioengine_core.testing.pytest_plugin import require_service

    weed = shutil.which("weed") or (ROOT / ".venv" / "bin" / "weed").exists()
    require_service(bool(weed), "the weed (SeaweedFS) binary")
    base = free_block(10)
    env = {
        "PATH": f"{ROOT / '.venv' / 'bin'}:/usr/bin:/bin",
        "BIOENGINE_S3_DIR": str(tmp_path / "s3"),
        "BIOENGINE_S3_PORT": str(base + 9),
        "BIOENGINE_S3_PORT_BASE": str(base),
    }
    bad = subprocess.run(["bash", str(script)], env={**env, "BIOENGINE_S3_PORT": "80x"},
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "BIOENGINE_S3_PORT" in bad.stderr
    try:
        up = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"http://127.0.0.1:{base + 9}" in up.stdout
        with pytest.raises(urllib.error.HTTPError):  # S3 answers (403 to an anonymous call)
            urllib.request.urlopen(f"http://127.0.0.1:{base + 9}/", timeout=5)
        # the tests find that server through the same variable (the conftest reads it)
        probe = subprocess.run(
            [
                str(ROOT / ".venv" / "bin" / "python"),
                "-c",
                "import conftest; print(conftest.SEAWEED_ENDPOINT)",
            ],
            env={**env, "BIOENGINE_S3_ENDPOINT": ""},
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert probe.stdout.strip() == f"http://127.0.0.1:{base + 9}", probe.stderr
    finally:
        subprocess.run(["bash", str(script), "stop"], env=env, capture_output=True, timeout=60)
