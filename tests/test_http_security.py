"""Who may do what on the HTTP gateway: API tokens with two roles, TLS, exposure rules.

Against `bioengine serve` with the real Triton: without a token 401, with an inference token
models run and admin calls are 403, with an admin token everything works; token values never
appear in the log, the status, the command line or any child process's environment.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest
from core_helpers import ROOT, Serve, free_port, local_config, run_cli, triton_available

from bioengine_core.testing.pytest_plugin import require_service

MODEL = ROOT / "models" / "unet2d_nuclei_broad"
MODEL_ID = "unet2d_nuclei_broad"
X = np.load(MODEL / "test_input.npy")
Y = np.load(MODEL / "test_output.npy")
ADMIN = "adm-" + "a1b2c3d4e5f6a7b8c9d0"
INFER = "inf-" + "0f9e8d7c6b5a4f3e2d1c"

pytestmark = pytest.mark.triton


def call(
    url: str,
    path: str,
    *,
    token: str | None = None,
    method: str = "GET",
    body: bytes | None = None,
    context=None,
) -> tuple[int, dict, dict]:
    """(status, JSON body, headers) of one request."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(url + path, data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60, context=context) as resp:
            raw = resp.read()
            status, hdrs = resp.status, dict(resp.headers)
    except urllib.error.HTTPError as exc:
        raw, status, hdrs = exc.read(), exc.code, dict(exc.headers)
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        data = {"_text": raw.decode(errors="replace")}
    return status, data, hdrs


def infer(url: str, token: str | None):
    import tritonclient.http as tc

    client = tc.InferenceServerClient(url.split("://")[1], network_timeout=120)
    inp = tc.InferInput("raw", list(X.shape), "FP32")
    inp.set_data_from_numpy(X, binary_data=True)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return client.infer(MODEL_ID, [inp], headers=headers).as_numpy("probability")


def environ_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return ""


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    tmp = tmp_path_factory.mktemp("sec")
    port = free_port()
    (tmp / "infer.token").write_text(INFER + "\n")
    cfg = local_config(
        tmp,
        port=port,
        name="e2e-sec",
        gateway='[[gateways.http.tokens]]\nrole = "admin"\nenv = "BIOENGINE_TEST_ADMIN_TOKEN"\n'
        'name = "ops"\n'
        f'[[gateways.http.tokens]]\nrole = "inference"\nfile = "{tmp / "infer.token"}"\n',
    )
    serve = Serve(cfg, env={"BIOENGINE_TEST_ADMIN_TOKEN": ADMIN})
    try:
        serve.wait_serving()
        yield serve, f"http://127.0.0.1:{port}", tmp
    finally:
        serve.stop()


def test_without_a_token_only_health_probes_answer(secured):
    _, url, _ = secured
    status, body, headers = call(
        url, "/v2/models/unet2d_nuclei_broad/infer", method="POST", body=b"{}"
    )
    assert status == 401 and "token" in body["error"]
    assert headers.get("WWW-Authenticate", "").startswith("Bearer")
    for path in (
        "/bioengine/status",
        "/metrics",
        "/bioengine/models",
        "/v2/models/unet2d_nuclei_broad",
    ):
        assert call(url, path)[0] == 401, path
    status, body, _ = call(url, "/health")
    assert status == 200 and body["replicas_ready"] == 1 and "models" not in body
    assert call(url, "/v2/health/ready")[0] == 200
    with pytest.raises(Exception) as info:
        infer(url, None)
    assert "401" in str(info.value) or "token" in str(info.value)
    assert call(url, "/bioengine/status", token="wrong-token-of-some-length")[0] == 401
    assert call(url, "/bioengine/status", token=INFER[:-1])[0] == 401


def test_inference_token_runs_models_but_is_no_admin(secured):
    _, url, _ = secured
    np.testing.assert_allclose(infer(url, INFER), Y, atol=1e-4, rtol=1e-4)
    status, data, _ = call(url, "/bioengine/status", token=INFER)
    assert status == 200 and data["ready_replicas"] == 1
    text = json.dumps(data)
    # no processes, endpoints, log paths or storage locations for non-admins
    for secret_detail in ('"pid"', '"log"', "127.0.0.1", "/state", '"url"'):
        assert secret_detail not in text, secret_detail
    assert call(url, "/metrics", token=INFER)[0] == 403
    status, body, _ = call(
        url, "/bioengine/scale", token=INFER, method="POST", body=b'{"replicas": 1}'
    )
    assert status == 403 and "admin" in body["error"]
    status, _, _ = call(
        url, f"/v2/repository/models/{MODEL_ID}/unload", token=INFER, method="POST", body=b"{}"
    )
    assert status == 403
    np.testing.assert_allclose(infer(url, INFER), Y, atol=1e-4, rtol=1e-4)  # still loaded


def test_admin_token_may_do_everything(secured):
    _, url, _ = secured
    np.testing.assert_allclose(infer(url, ADMIN), Y, atol=1e-4, rtol=1e-4)
    status, data, _ = call(url, "/bioengine/status", token=ADMIN)
    assert status == 200 and data["replicas"][0]["url"].startswith("http://127.0.0.1:")
    assert data["replicas"][0]["details"]["pid"] > 0
    status, _, _ = call(url, "/metrics", token=ADMIN)
    assert status == 200
    status, body, _ = call(
        url, "/bioengine/scale", token=ADMIN, method="POST", body=b'{"replicas": 1}'
    )
    assert status == 200 and body == {"replicas": 1}
    status, body, _ = call(
        url, "/bioengine/scale", token=ADMIN, method="POST", body=b'{"replicas": -3}'
    )
    assert status == 400


def test_cli_status_uses_a_token_file_or_env(secured):
    _, url, tmp = secured
    result = run_cli("status", "--url", url)
    assert result.returncode == 1 and "401" in result.stderr and "--token-file" in result.stderr
    result = run_cli("status", "--url", url, "--token-file", str(tmp / "infer.token"))
    assert result.returncode == 0, result.stderr
    assert "1/1 replicas ready" in result.stdout
    result = run_cli("status", "--url", url, env={"BIOENGINE_TOKEN": ADMIN})
    assert result.returncode == 0 and "127.0.0.1" in result.stdout, result.stdout
    out = tmp / "y.npy"
    result = run_cli(
        "infer", "--url", url, "--model", MODEL_ID, "--input", str(MODEL / "test_input.npy"),
        "--output", str(out), "--token-file", str(tmp / "infer.token"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(out), Y, atol=1e-4, rtol=1e-4)


def test_token_values_never_leak(secured):
    serve, url, _ = secured
    call(url, "/bioengine/status", token="a-wrong-token-" + ADMIN[::-1])
    _, status, _ = call(url, "/bioengine/status", token=ADMIN)
    everything = serve.output + json.dumps(status)
    assert ADMIN not in everything and INFER not in everything
    serve_proc = psutil.Process(serve.proc.pid)
    assert ADMIN not in " ".join(serve_proc.cmdline())
    children = serve_proc.children(recursive=True)
    assert children, "serve should have started a Triton replica"
    state = Path(str(secured[2])) / "state"
    tritons = [
        p
        for p in psutil.process_iter(["pid", "cmdline"])
        if (p.info["cmdline"] or [""])[0].endswith("tritonserver")
        and str(state) in " ".join(p.info["cmdline"])
    ]
    assert tritons, "no tritonserver of this deployment found"
    procs = tritons + [c for t in tritons for c in t.children(recursive=True)]
    assert any("stub" in " ".join(p.cmdline()) for p in procs), "expected python backend stubs"
    for proc in procs:
        env = environ_of(proc.pid)
        assert env, f"cannot read the environment of {proc.pid}"
        assert ADMIN not in env and "BIOENGINE_TEST_ADMIN_TOKEN" not in env, proc.cmdline()


def test_exposed_address_needs_tokens_or_explicit_anonymous(tmp_path):
    cfg = tmp_path / "site.toml"
    cfg.write_text('[gateways.http]\nkind = "http"\nhost = "0.0.0.0"\n')
    result = run_cli("config", "check", "--config", str(cfg))
    assert result.returncode == 2
    assert "[gateways.http] key 'host'" in result.stderr and "allow_anonymous" in result.stderr
    cfg.write_text('[gateways.http]\nkind = "http"\nhost = "0.0.0.0"\nallow_anonymous = true\n')
    assert run_cli("config", "check", "--config", str(cfg)).returncode == 0
    cfg.write_text(
        '[gateways.http]\nkind = "http"\nhost = "::"\n'
        '[[gateways.http.tokens]]\nrole = "admin"\nenv = "BIOENGINE_UNSET_TOKEN_VAR"\n'
    )
    result = run_cli("config", "check", "--config", str(cfg))
    assert result.returncode == 2 and "BIOENGINE_UNSET_TOKEN_VAR is not set" in result.stderr
    cfg.write_text('[gateways.http]\nkind = "http"\ntls_cert_file = "c.pem"\n')
    result = run_cli("config", "check", "--config", str(cfg))
    assert result.returncode == 2 and "tls_key_file" in result.stderr


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


def test_tls_and_anonymous_on_all_addresses(tmp_path):
    """host 0.0.0.0 + allow_anonymous + TLS: serve warns; anonymous callers infer over
    HTTPS and see only the status summary; plain HTTP gets no answer."""
    import ssl

    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    cert, key = _self_signed(tmp_path)
    port = free_port()
    cfg = local_config(
        tmp_path,
        port=port,
        name="e2e-tls",
        gateway=f'host = "0.0.0.0"\nallow_anonymous = true\n'
        f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n',
    )
    serve = Serve(cfg)
    try:
        serve.wait_serving()
        assert "WARNING" in serve.output and "allow_anonymous" in serve.output
        url = f"https://127.0.0.1:{port}"
        ctx = ssl.create_default_context(cafile=str(cert))
        status, data, _ = call(url, "/bioengine/status", context=ctx)
        assert status == 200 and "pid" not in json.dumps(data)
        status, body, _ = call(url, "/metrics", context=ctx)
        assert status == 403 and "anonymous callers have the inference role" in body["error"]
        with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10).read()
        out = tmp_path / "y.npy"
        result = run_cli(
            "infer", "--url", url, "--model", MODEL_ID, "--input", str(MODEL / "test_input.npy"),
            "--output", str(out), "--cacert", str(cert),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        np.testing.assert_allclose(np.load(out), Y, atol=1e-4, rtol=1e-4)
        result = run_cli("status", "--url", url, "--cacert", str(cert))
        assert result.returncode == 0 and "1/1 replicas ready" in result.stdout, result.stderr
    finally:
        assert serve.stop() == 0


def test_token_file_problems_name_the_key(tmp_path):
    from bioengine_core.config import load_config
    from bioengine_core.engine import Engine
    from bioengine_core.errors import ConfigError

    cfg = tmp_path / "site.toml"
    cfg.write_text(
        f'[engine]\nstate_dir = "{tmp_path / "s"}"\n[gateways.http]\nkind = "http"\n'
        '[[gateways.http.tokens]]\nrole = "inference"\nfile = "missing.token"\n'
    )
    with pytest.raises(ConfigError) as info:
        Engine(load_config(cfg))
    assert "tokens #1 key 'file'" in str(info.value) and "missing.token" in str(info.value)
    (tmp_path / "short.token").write_text("abc")
    cfg.write_text(cfg.read_text().replace("missing.token", "short.token"))
    with pytest.raises(ConfigError) as info:
        Engine(load_config(cfg))
    assert "at least 16 characters" in str(info.value)
