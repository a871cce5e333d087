"""Catalog mode against a real Triton and the zoo emulator: any allowed zoo id is served on its
first request (stock tritonclient), concurrent first requests share one load, the budget unloads
the least recently used model (logged, in `bioengine status`), search covers models not loaded,
and broken packages fail with clear errors while other models keep being served."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as httpclient
from core_helpers import Serve, free_port, get_status, run_cli, triton_available

from bioengine_core.bundled import bundled_path
from bioengine_core.catalogmode import CatalogSettings, check_catalog, matches
from bioengine_core.testing.pytest_plugin import require_service
from bioengine_core.testing.zoo import ZooEmulator, bundled_zoo

TINY = bundled_path("tiny_affine")
X = np.load(TINY / "test_input.npy")
Y = np.load(TINY / "test_output.npy")
TINY_IDS = ["tiny-b", "tiny-c", "tiny-d", "tiny-herd"]


def _site(tmp: Path, zoo: ZooEmulator, port: int, catalog: str) -> Path:
    text = (
        f'[engine]\nname = "catalog-e2e"\nstate_dir = "{tmp / "state"}"\nhealth_interval = 0.5\n'
        f'\n[executor]\nkind = "local"\nmode = "process"\n'
        f'\n[gateways.http]\nkind = "http"\nport = {port}\n'
        f"\n{zoo.toml(retries=2, http_timeout=5)}\n[catalog]\n{catalog}"
    )
    path = tmp / "site.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    tmp = tmp_path_factory.mktemp("catalog")
    zoo = bundled_zoo()
    for model_id in TINY_IDS:
        zoo.publish(TINY, model_id, edit=lambda d: d.update(tags=["tiny", "affine", "demo"]))
    zoo.publish(TINY, "tampered-tiny")
    zoo.publish(TINY, "flaky-tiny")
    zoo.publish(TINY, "hidden-tiny")
    zoo.tamper("tampered-tiny", "weights.onnx")
    zoo.start()
    port = free_port()
    config = _site(
        tmp,
        zoo,
        port,
        'enabled = true\nallow = ["tiny-*", "flaky-*", "tampered-*", "ghost-*", "affable-shark"]\n'
        'deny = ["hidden-*"]\nmax_loaded = 2\nload_timeout = 120\nretry_failed_after = 0\n',
    )
    serve = Serve(config)
    try:
        serve.wait_serving()
        yield {"url": f"http://127.0.0.1:{port}", "serve": serve, "zoo": zoo, "tmp": tmp}
    finally:
        serve.stop()
        zoo.stop()
        (tmp / "serve.log").write_text(serve.output)  # kept for a failed run's reader


def _infer(url: str, model: str, x: np.ndarray = X) -> np.ndarray:
    client = httpclient.InferenceServerClient(url.removeprefix("http://"), network_timeout=180)
    try:
        inp = httpclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x.astype(np.float32), binary_data=True)
        return client.infer(model, [inp]).as_numpy("y")
    finally:
        client.close()


def _get(url: str) -> tuple[int, dict | list]:
    try:
        with urllib.request.urlopen(url, timeout=120) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _loads_of(serve: Serve, model: str) -> int:
    return serve.output.count(f"model {model}: loading on demand")


def test_a_zoo_id_never_loaded_is_served_on_its_first_request(site):
    url, serve = site["url"], site["serve"]
    assert "catalog: " in serve.output and "allowed ones load on request" in serve.output
    status, before = _get(f"{url}/bioengine/models?q=tiny-b")
    assert status == 200 and [m["state"] for m in before] == ["available"]
    np.testing.assert_allclose(_infer(url, "tiny-b"), Y, atol=1e-5)
    np.testing.assert_allclose(_infer(url, "tiny-b"), Y, atol=1e-5)
    assert _loads_of(serve, "tiny-b") == 1  # the second request found it loaded
    assert "model tiny-b: ready (loaded in" in serve.output


def test_ten_concurrent_first_requests_share_one_load(site):
    url, serve, zoo = site["url"], site["serve"], site["zoo"]
    fetched_before = sum("tiny-herd" in r and "weights.onnx" in r for r in zoo.requests)
    results: list[object] = []

    def one() -> None:
        try:
            results.append(_infer(url, "tiny-herd"))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert len(results) == 10
    for r in results:
        assert isinstance(r, np.ndarray), r
        np.testing.assert_allclose(r, Y, atol=1e-5)
    assert _loads_of(serve, "tiny-herd") == 1
    fetched = sum("tiny-herd" in r and "weights.onnx" in r for r in zoo.requests)
    assert fetched - fetched_before == 1, "the weights were downloaded once"


def test_budget_unloads_the_least_recently_used_model(site):
    url, serve, tmp = site["url"], site["serve"], site["tmp"]
    for _ in range(2):
        for model in ("tiny-b", "tiny-c", "tiny-d"):
            np.testing.assert_allclose(_infer(url, model), Y, atol=1e-5)
            loaded = [m["id"] for m in get_status(url)["models"]]
            assert len(loaded) <= 2 and model in loaded, loaded
    assert "unloaded (least recently used; [catalog] max_loaded = 2)" in serve.output
    catalog = get_status(url)["catalog"]
    rows = {m["id"]: m for m in catalog["models"]}
    assert catalog["loaded"] == 2 and catalog["max_loaded"] == 2
    assert rows["tiny-b"]["unloads"] >= 1 and rows["tiny-b"]["loads"] >= 2
    shown = run_cli("status", "--url", url)
    assert shown.returncode == 0, shown.stderr
    assert "catalog models" in shown.stdout and "least recently used" in shown.stdout
    assert (tmp / "state").is_dir()


def test_tampered_package_is_rejected_naming_the_file_and_cached_nowhere(site):
    url, tmp = site["url"], site["tmp"]
    with pytest.raises(Exception) as info:
        _infer(url, "tampered-tiny")
    assert "tampered-tiny" in str(info.value) and "weights.onnx" in str(info.value)
    assert "sha256" in str(info.value)
    packages = tmp / "state" / "sources" / "bioimageio" / "packages"
    assert not any("tampered" in p.name for p in packages.iterdir())
    status, rows = _get(f"{url}/bioengine/models?q=tampered")
    assert rows[0]["state"] == "failed" and "weights.onnx" in rows[0]["reason"]
    np.testing.assert_allclose(_infer(url, "tiny-b"), Y, atol=1e-5)  # others keep serving


def test_unknown_denied_and_invalid_ids_are_clear_404s(site):
    url = site["url"]
    for model, words in [
        ("ghost-model", ["ghost-model", "no such model in the zoo"]),
        ("hidden-tiny", ["hidden-tiny", "not offered by this site's catalog"]),
        ("not-allowed", ["not-allowed", "not offered by this site's catalog"]),
    ]:
        status, body = _get(f"{url}/v2/models/{model}")
        assert status == 404, (model, body)
        for word in words:
            assert word in body["error"], (model, body)
    status, body = _get(f"{url}/v2/models/tiny..%2F..%2Fetc")
    assert status == 400 and "invalid model id" in body["error"], body
    status, body = _get(f"{url}/v2/models/{'a' * 150}")
    assert status == 404 and "unknown model" in body["error"]
    assert get_status(url)["ready_replicas"] == 1


def test_a_dropped_download_is_retried(site):
    url, zoo, serve = site["url"], site["zoo"], site["serve"]
    zoo.drop("flaky-tiny", "weights.onnx", times=4)  # more than one try's 3 attempts
    np.testing.assert_allclose(_infer(url, "flaky-tiny"), Y, atol=1e-5)
    assert any("flaky-tiny" in line and "retrying" in line for line in serve.lines)


def test_search_lists_the_whole_allowed_catalog(site):
    url = site["url"]
    status, rows = _get(f"{url}/bioengine/models?q=tiny+demo")
    assert status == 200
    ids = {r["id"] for r in rows}
    assert set(TINY_IDS) <= ids and "hidden-tiny" not in ids and "affable-shark" not in ids
    assert {r["state"] for r in rows} <= {"ready", "available", "loading"}
    status, rows = _get(f"{url}/bioengine/models?q=nuclei")
    assert [r["id"] for r in rows] == ["affable-shark"] and rows[0]["state"] == "available"
    assert _get(f"{url}/bioengine/models?limit=0")[0] == 400
    assert _get(f"{url}/bioengine/models?q=" + "x" * 300)[0] == 400
    listed = run_cli("models", "search", "nuclei", "--url", url)
    assert listed.returncode == 0, listed.stderr
    assert "affable-shark" in listed.stdout and "available" in listed.stdout


def test_allow_patterns_and_config_problems_name_the_key(tmp_path):
    assert matches("tiny-b", [], ["tiny-*"]) and not matches("tiny-b", [], ["tag:tiny"])
    assert matches("x", ["Segmentation"], ["tag:segmentation"])
    problems = check_catalog(
        CatalogSettings(enabled=True, source="nope", allow=["a-*"], preload=["b"]), {"zip"}, "s"
    )
    assert any("[catalog] key 'source'" in p for p in problems)
    assert any("[catalog] key 'preload': 'b' is not allowed" in p for p in problems)
    site = tmp_path / "site.toml"
    site.write_text('[catalog]\nenabled = true\nmax_loaded = -1\nallow = ["../x"]\n')
    checked = run_cli("config", "check", "--offline", "--config", str(site))
    assert checked.returncode == 2
    assert "[catalog] key 'max_loaded'" in checked.stderr
    assert "[catalog] key 'allow'" in checked.stderr


def test_a_wrong_input_names_the_model_and_input_through_the_shared_runner(site):
    url = site["url"]
    with pytest.raises(Exception) as info:
        _infer(url, "tiny-b", np.zeros((1, 2, 4, 4), np.float32))
    assert "tiny-b" in str(info.value) and "'x'" in str(info.value)
    np.testing.assert_allclose(_infer(url, "tiny-b"), Y, atol=1e-5)


def test_the_runner_wire_refuses_malformed_messages():
    """The socket between thin stubs and the shared runner: arrays round-trip; an oversized
    header or an unknown dtype is refused, not trusted."""
    import importlib.util
    import socket
    import struct

    path = (
        Path(__file__).resolve().parents[1] / "bioengine_core" / "templates" / "bioengine_wire.py"
    )
    spec = importlib.util.spec_from_file_location("wire_under_test", path)
    wire = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wire)
    a, b = socket.socketpair()
    try:
        arrays = {"x": np.arange(12, dtype=np.float32).reshape(3, 4), "e": np.zeros((0,), "u1")}
        wire.send_msg(a, {"op": "predict"}, arrays)
        header, got = wire.recv_msg(b)
        assert header["op"] == "predict"
        np.testing.assert_array_equal(got["x"], arrays["x"])
        assert got["e"].shape == (0,)
        big = {"raw": np.random.default_rng(0).random((1, 1, 1024, 1024), np.float32)}
        sender = threading.Thread(target=wire.send_msg, args=(a, {"op": "predict"}, big))
        sender.start()  # 4 MiB: more than a socket buffer, written in parts
        _, got = wire.recv_msg(b)
        sender.join(30)
        np.testing.assert_array_equal(got["raw"], big["raw"])
        a.sendall(struct.pack("!I", wire.MAX_HEADER + 1))
        with pytest.raises(wire.WireError):
            wire.recv_msg(b)
        body = json.dumps({"arrays": [{"id": "x", "dtype": "object", "shape": [1]}]}).encode()
        a.sendall(struct.pack("!I", len(body)) + body)
        with pytest.raises(wire.WireError):
            wire.recv_msg(b)
        a.close()
        with pytest.raises(EOFError):
            wire.recv_msg(b)
    finally:
        b.close()


def test_a_replica_added_later_serves_the_models_loaded_before_it(site):
    """Scale 1 -> 2 after models were loaded on demand: the new replica starts with them (and
    loads any loaded while it started), so requests spread over both replicas all succeed."""
    url = site["url"]
    np.testing.assert_allclose(_infer(url, "tiny-b"), Y, atol=1e-5)
    request = urllib.request.Request(
        f"{url}/bioengine/scale", data=b'{"replicas": 2}', method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 200
    deadline = time.monotonic() + 180
    while get_status(url)["ready_replicas"] < 2:
        assert time.monotonic() < deadline, get_status(url)
        time.sleep(0.5)
    np.testing.assert_allclose(_infer(url, "tiny-c"), Y, atol=1e-5)  # loaded on both
    for _ in range(12):
        for model in ("tiny-b", "tiny-c"):
            np.testing.assert_allclose(_infer(url, model), Y, atol=1e-5)
    rows = get_status(url)["replicas"]
    assert len(rows) == 2 and all(r["requests"] > 0 for r in rows), rows
