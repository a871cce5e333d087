"""Adversarial HTTP against `bioengine serve` (issue #8): nothing a client sends bends the gateway.

A probe without credentials once put a percent-encoded CR/LF from a path segment onto the
upstream request line: the replica got a second request (which unloaded the model) and from
then on every client got the answer to the previous request. Here one `bioengine serve` with two
real Triton replicas gets a corpus of injection attempts, sent over raw sockets (so nothing
normalises them) and with http.client: in paths, versions, headers, bodies, methods, pipelined
requests and malformed HTTP. Every attempt must get a 4xx (never a 5xx, never a dropped
server), with a JSON `error` naming the problem wherever the gateway itself answers. Afterwards
the models loaded on each replica (asked of Triton directly) are unchanged, and 1,000 requests
alternating between two inputs, over fresh and reused connections from 4 threads, each get
their own answer. Serve's log holds no body bytes from the corpus and no overlong line.
"""

from __future__ import annotations

import http.client
import io
import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import tritonclient.http as tc
from core_helpers import (
    ROOT,
    Serve,
    free_port,
    get_status,
    local_config,
    triton_available,
    wait_for,
)

from bioengine_core.testing.pytest_plugin import require_service

pytestmark = pytest.mark.triton

MODEL = ROOT / "models" / "unet2d_nuclei_broad"
M = "unet2d_nuclei_broad"
X = np.load(MODEL / "test_input.npy")
Y = np.load(MODEL / "test_output.npy")
X2 = np.ascontiguousarray(X[..., ::-1, :])
"""A second input (the test image flipped upside down): a different, known answer."""
NBYTES = X.nbytes
MARK = "ZQX7-ADVERSARIAL-BODY-MARKER"
"""In every corpus body: must never show up in serve's log."""
MARKB = MARK.encode()
N_REQUESTS = 1000
MAX_LOG_LINE = 4000


# ----------------------------------------------------------------------------- fixtures
@dataclass
class Served:
    serve: Serve
    url: str
    port: int
    expected: dict[str, np.ndarray] = field(default_factory=dict)
    replicas_before: dict[str, Any] = field(default_factory=dict)


def replica_models(url: str) -> dict[str, list[tuple[str, str]]]:
    """{replica id: [(model, version)] loaded (state READY)}, asked of each Triton directly."""
    status = get_status(url)
    found = {}
    for replica in status["replicas"]:
        req = urllib.request.Request(
            replica["url"] + "/v2/repository/index", data=b"{}", method="POST"
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            index = json.loads(resp.read())
        found[replica["id"]] = sorted(
            (m["name"], m.get("version", "")) for m in index if m.get("state") == "READY"
        )
    return found


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[Served]:
    """One `bioengine serve` with two replicas; expected answers and replica models recorded
    before any adversarial request."""
    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    tmp = tmp_path_factory.mktemp("adversarial")
    port = free_port()
    serve = Serve(local_config(tmp, port=port, replicas=2, name="adversarial"))
    try:
        serve.wait_serving()
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: get_status(url)["ready_replicas"] == 2, 180, "two ready replicas")
        s = Served(serve, url, port)
        s.replicas_before = replica_models(url)
        assert len(s.replicas_before) == 2
        for models in s.replicas_before.values():
            assert (M, "1") in models
        for name, x in (("x", X), ("x2", X2)):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            status, out, _ = infer(conn, x, f"expected-{name}")
            conn.close()
            assert status == 200
            s.expected[name] = out
        np.testing.assert_allclose(s.expected["x"], Y, atol=1e-4, rtol=1e-4)
        # a swapped answer must be detectable
        assert np.abs(s.expected["x"] - s.expected["x2"]).max() > 0.1
        yield s
    finally:
        serve.stop()
        print(serve.output[-20000:])


# ----------------------------------------------------------------------------- HTTP helpers
def infer_body(x: np.ndarray, request_id: str = "") -> tuple[bytes, int]:
    """A tritonclient-layout infer body (binary tensor in and out) and its JSON header size."""
    inp = tc.InferInput("raw", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    body, json_size = tc.InferenceServerClient.generate_request_body(
        [inp], outputs=[tc.InferRequestedOutput("probability")], request_id=request_id
    )
    return body, json_size


BODY_X, HL_X = infer_body(X)
BODY_X2, HL_X2 = infer_body(X2)


def parse_infer(status: int, headers: dict[str, str], data: bytes) -> tuple[str | None, np.ndarray]:
    """(id, probability) of a 200 infer answer."""
    assert status == 200, (status, data[:500])
    hl = headers.get("inference-header-content-length")
    result = tc.InferenceServerClient.parse_response_body(
        data, header_length=int(hl) if hl else None
    )
    return result.get_response().get("id"), result.as_numpy("probability")


def infer_raw(
    conn: http.client.HTTPConnection, x: np.ndarray, request_id: str
) -> tuple[int, dict[str, str], bytes]:
    """POST an infer request for `x`; (status, lower-cased headers, body)."""
    body, hl = infer_body(x, request_id)
    conn.request(
        "POST",
        f"/v2/models/{M}/infer",
        body,
        {"Inference-Header-Content-Length": str(hl), "Content-Type": "application/octet-stream"},
    )
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data


def infer(
    conn: http.client.HTTPConnection, x: np.ndarray, request_id: str
) -> tuple[int, np.ndarray, str | None]:
    status, headers, data = infer_raw(conn, x, request_id)
    got_id, out = parse_infer(status, headers, data)
    return status, out, got_id


class _Reader(io.BufferedReader):
    """A socket's buffered reader that http.client.HTTPResponse cannot close (it closes its
    file after each response), so that several responses can be read from one connection."""

    def close(self) -> None:
        pass


def socket_reader(sock: socket.socket) -> _Reader:
    return _Reader(socket.SocketIO(sock, "rb"), 1 << 16)  # type: ignore[arg-type]


class _FileSock:
    """Hands http.client.HTTPResponse a reader shared by the responses of one connection."""

    def __init__(self, f):
        self._f = f

    def makefile(self, *args, **kwargs):
        return self._f


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> str:
        assert self.headers.get("content-type", "").startswith("application/json"), (
            f"not a JSON error: {self.status} {self.headers} {self.body[:300]!r}"
        )
        data = json.loads(self.body)
        assert isinstance(data, dict) and isinstance(data.get("error"), str), data
        assert data["error"], data
        return data["error"]


def read_answer(f, method: str = "GET") -> Answer:
    resp = http.client.HTTPResponse(_FileSock(f), method=method)  # type: ignore[arg-type]
    resp.begin()
    body = resp.read()
    return Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, body)


def exchange(
    port: int, data: bytes, *, methods: tuple[str, ...] = ("GET",), timeout: float = 60
) -> list[Answer]:
    """Send raw bytes on a fresh connection; read one answer per entry of `methods`."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
        except OSError:
            pass  # the server may answer and close before it has read everything
        f = socket_reader(sock)
        answers = []
        for method in methods:
            try:
                answers.append(read_answer(f, method))
            except (http.client.HTTPException, OSError) as exc:
                raise AssertionError(
                    f"no answer #{len(answers) + 1} to {data[:200]!r}...: {exc!r}"
                ) from None
        return answers


def check_4xx(answer: Answer, fragment: str | None, what: str) -> None:
    """A 4xx; with a JSON error naming `fragment` unless fragment is None (the HTTP parser's
    own answer to a request that is not HTTP/1.1)."""
    assert 400 <= answer.status < 500, (
        f"{what}: expected a 4xx, got {answer.status}: {answer.body[:300]!r}"
    )
    if fragment is not None:
        error = answer.error()
        assert fragment.lower() in error.lower(), f"{what}: {fragment!r} not in {error!r}"


def assert_alive(s: Served) -> None:
    with urllib.request.urlopen(f"{s.url}/health", timeout=30) as resp:
        assert resp.status == 200
        assert json.loads(resp.read())["replicas_ready"] == 2


# ----------------------------------------------------------------------------- the corpus
def get(path: bytes | str, extra: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    path = path.encode() if isinstance(path, str) else path
    return (
        b"GET "
        + path
        + b" "
        + version
        + b"\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        + extra
        + b"\r\n"
    )


def post(
    path: bytes | str,
    body: bytes,
    extra: bytes = b"",
    *,
    method: bytes = b"POST",
    version: bytes = b"HTTP/1.1",
    length: bool = True,
    close: bool = True,
) -> bytes:
    path = path.encode() if isinstance(path, str) else path
    head = method + b" " + path + b" " + version + b"\r\nHost: 127.0.0.1\r\n"
    if close:
        head += b"Connection: close\r\n"
    if length:
        head += b"Content-Length: " + str(len(body)).encode() + b"\r\n"
    return head + extra + b"\r\n" + body


def jbody(header: Any, tail: bytes = b"") -> tuple[bytes, bytes]:
    """(body, Inference-Header-Content-Length line) for a JSON header and binary tail."""
    head = json.dumps(header).encode()
    return head + tail, b"Inference-Header-Content-Length: " + str(len(head)).encode() + b"\r\n"


def raw_input(**override) -> dict:
    item = {
        "name": "raw",
        "shape": [1, 1, 512, 512],
        "datatype": "FP32",
        "parameters": {"binary_data_size": NBYTES},
    }
    item.update(override)
    return item


INFER = f"/v2/models/{M}/infer"
UNLOAD = f"/v2/repository/models/{M}/unload"
VERSIONED = f"/v2/models/{M}/versions"
TENSOR = b"\0" * NBYTES


@dataclass(frozen=True)
class Case:
    id: str
    data: bytes
    fragment: str | None = ""
    """None: any 4xx (aiohttp's parser answers); "": a JSON error; text: named in the error."""
    method: str = "GET"


def _body_case(id: str, header: Any, tail: bytes, fragment: str, path: str = INFER) -> Case:
    body, hl = jbody(header, tail)
    return Case(id, post(path, body, hl), fragment, "POST")


def corpus() -> list[Case]:
    c: list[Case] = []
    # ---- paths: versions
    for version, fragment in [
        (f"1%0d%0aGET%20{UNLOAD}", ""),
        (f"1%0d%0aGET%20{UNLOAD.replace('/', '%2f')}", "version"),
        ("1%0d%0a", "version"),
        ("1%0a", "version"),
        ("1%0d", "version"),
        ("%0a1", "version"),
        ("1%00", "version"),
        ("1%20", "version"),
        ("-1", "version"),
        ("1.0", "version"),
        ("99999999999", "version"),
        ("%2e%2e", "version"),
        ("..", ""),
        ("%EF%BC%91", "version"),  # fullwidth digit one
        ("%D9%A1", "version"),  # Arabic-Indic digit one
        ("0x1", "version"),
        ("+1", "version"),
        ("0", "version"),  # a number Triton does not serve: Triton's own 4xx
    ]:
        c.append(Case(f"version {version}", get(f"{VERSIONED}/{version}"), fragment))
        c.append(Case(f"version {version} ready", get(f"{VERSIONED}/{version}/ready"), fragment))
    c.append(
        Case(
            "version 1%0a on infer",
            post(f"{VERSIONED}/1%0a/infer", b'{"id": "' + MARKB + b'"}'),
            "version",
            "POST",
        )
    )
    c.append(
        Case(
            "version injection on infer",
            post(f"{VERSIONED}/1%0d%0aGET%20{UNLOAD.replace('/', '%2f')}/infer", b"{}"),
            "version",
            "POST",
        )
    )
    # ---- paths: model ids
    long_id = "a" * 8000
    for path, fragment in [
        (f"/v2/models/{M}%0d%0aX-Injected:%20yes", "unknown model"),
        (f"/v2/models/{M}%0d%0a%0d%0aGET%20{UNLOAD.replace('/', '%2f')}", "unknown model"),
        (f"/v2/models/{M}%00", "unknown model"),
        (f"/v2/models/{M}%2fready", "unknown model"),
        ("/v2/models/%2e%2e/versions/1", "unknown model"),
        ("/v2/models/..%2f..%2fhealth", "unknown model"),
        (f"/v2/models/%2e%2e%2frepository%2fmodels%2f{M}%2funload", "unknown model"),
        (f"/v2/models/{M}/../../health", ""),
        (f"/v2/models/{M}/%2e%2e/%2e%2e/health", ""),
        (f"/v2/models/{long_id}", "unknown model"),
        ("/v2/models/%C3%A9%E2%80%AE%F0%9F%A7%AC", "unknown model"),
        ("/v2/models/%ff%fe", "unknown model"),
        ("/v2/models/no_such_model", "unknown model 'no_such_model'"),
        ("/v2/models/no_such_model/ready", "unknown model"),
        ("/v2/models/no_such_model/versions/1/config", "unknown model"),
        (f"/v2/models/{M}/nope", ""),
        (f"/v2/models/{M}/versions/1/nope", ""),
        ("/v2/repository/models", ""),
        ("/nope", ""),
        (f"//v2/models/{M}/versions/1%0a", ""),
        (f"/v2/models/{M}/versions/1%0a?x=%0d%0a", "version"),
    ]:
        c.append(Case(f"path {path[:70]}", get(path), fragment))
    c.append(
        Case(
            "unknown model infer",
            post("/v2/models/no_such_model/infer", b'{"id": "' + MARKB + b'"}'),
            "unknown model",
            "POST",
        )
    )
    # GET of the unload route from the issue: never an unload
    c.append(Case("GET unload", get(UNLOAD), ""))
    c.append(Case("GET unload injected", get(f"{VERSIONED}/1%0d%0aGET%20{UNLOAD}"), ""))
    # raw bytes the parser must refuse (nothing normalises them here)
    for id, data in [
        ("raw CRLF in path", get(f"/v2/models/{M}\r\nGET {UNLOAD} HTTP/1.1\r\nHost: x".encode())),
        ("raw LF in path", get(f"{VERSIONED}/1\nGET {UNLOAD}".encode())),
        ("raw CR in path", get(f"{VERSIONED}/1\rGET {UNLOAD}".encode())),
        ("raw NUL in path", get(f"/v2/models/{M}\0/ready".encode())),
        ("raw space in path", get(f"{VERSIONED}/1 GET {UNLOAD}".encode())),
        ("raw UTF-8 in path", get("/v2/models/é".encode())),
        ("raw latin-1 in path", get(b"/v2/models/\xe9\xff")),
        ("overlong request line", get("/v2/models/" + "a" * 9000)),
    ]:
        c.append(Case(id, data, None))
    # ---- headers
    hl_line = b"Inference-Header-Content-Length: "
    small = b'{"id": "' + MARKB + b'"}'
    for id, data, fragment in [
        ("CR LF in header value", get(f"/v2/models/{M}", b"X-A: a\r\nb\r\n"), None),
        ("LF in header value", get(f"/v2/models/{M}", b"X-A: a\nb\r\n"), None),
        ("CR in header value", get(f"/v2/models/{M}", b"X-A: a\rb\r\n"), None),
        ("NUL in header value", get(f"/v2/models/{M}", b"X-A: a\0b\r\n"), None),
        ("obs-fold header", get(f"/v2/models/{M}", b"X-A: a\r\n b\r\n"), None),
        ("header name with space", get(f"/v2/models/{M}", b"X A: b\r\n"), None),
        ("huge header", get(f"/v2/models/{M}", b"X-Big: " + b"a" * 9000 + b"\r\n"), None),
        (
            "huge header on infer",
            post(INFER, small, b"X-Big: " + MARKB + b"a" * 9000 + b"\r\n"),
            None,
        ),
        (
            "UTF-8 header value on infer",
            post(INFER, small, "X-Name: é\u202e🧬".encode() + b"\r\n"),
            "malformed",
        ),
        (
            "non-UTF-8 header value on infer",
            post(INFER, small, b"X-Name: \xff\xfe\xe9\r\n"),
            "malformed",
        ),
        (
            "non-UTF-8 bearer token",
            post(INFER, small, b"Authorization: Bearer \xff\xfe\r\n"),
            "token",
        ),
        ("empty bearer token", post(INFER, small, b"Authorization: Bearer\r\n"), "token"),
        (
            "UTF-8 header length",
            post(INFER, small, hl_line + "٣".encode() + b"\r\n"),
            "",  # int() reads Unicode digits: a 400 for the JSON, not for the header
        ),
        (
            "negative header length",
            post(INFER, small, hl_line + b"-1\r\n"),
            "Inference-Header-Content-Length",
        ),
        (
            "zero header length",
            post(INFER, small, hl_line + b"0\r\n"),
            "Inference-Header-Content-Length",
        ),
        (
            "huge header length",
            post(INFER, small, hl_line + b"99999999999999999999\r\n"),
            "Inference-Header-Content-Length",
        ),
        (
            "non-numeric header length",
            post(INFER, small, hl_line + b"abc\r\n"),
            "Inference-Header-Content-Length",
        ),
        (
            "empty header length",
            post(INFER, small, hl_line + b"\r\n"),
            "Inference-Header-Content-Length",
        ),
        (
            "float header length",
            post(INFER, small, hl_line + b"1.5\r\n"),
            "Inference-Header-Content-Length",
        ),
        (
            "header length beyond body",
            post(INFER, small, hl_line + b"1000\r\n"),
            "Inference-Header-Content-Length",
        ),
        (
            "5000-digit header length",
            post(INFER, small, hl_line + b"9" * 5000 + b"\r\n"),
            "Inference-Header-Content-Length",
        ),
        (
            "header length with injected header",
            post(INFER, small, hl_line + b"5\r\nX-Injected: " + MARKB + b"\r\n"),
            "",
        ),
        ("duplicate Content-Length", post(INFER, small, b"Content-Length: 3\r\n"), None),
        (
            "duplicate equal Content-Length",
            post(INFER, small, b"Content-Length: " + str(len(small)).encode() + b"\r\n"),
            None,
        ),
        (
            "Content-Length and Transfer-Encoding",
            post(INFER, small, b"Transfer-Encoding: chunked\r\n"),
            None,
        ),
        (
            "negative Content-Length",
            post(INFER, small, b"Content-Length: -1\r\n", length=False),
            None,
        ),
        (
            "overflowing Content-Length",
            post(INFER, small, b"Content-Length: 99999999999999999999999\r\n", length=False),
            None,
        ),
        (
            "non-numeric Content-Length",
            post(INFER, small, b"Content-Length: 1e3\r\n", length=False),
            None,
        ),
        (
            "Content-Length beyond the limit",
            post(INFER, b"", b"Content-Length: 300000000\r\n", length=False),
            "max_request_bytes",
        ),
        (
            "Content-Length beyond the limit, Expect 100",
            post(
                INFER, b"", b"Content-Length: 300000000\r\nExpect: 100-continue\r\n", length=False
            ),
            "max_request_bytes",
        ),
        ("compressed body", post(INFER, small, b"Content-Encoding: gzip\r\n"), "compressed"),
        (
            "bad chunk size",
            post(
                INFER,
                b"zz\r\n" + small + b"\r\n0\r\n\r\n",
                b"Transfer-Encoding: chunked\r\n",
                length=False,
            ),
            None,
        ),
        (
            "chunked garbage body",
            post(
                INFER,
                b"%x\r\n" % len(small) + small + b"\r\n0\r\n\r\n",
                b"Transfer-Encoding: chunked\r\n",
                length=False,
            ),
            "malformed",
        ),
        (
            "body longer than Content-Length",
            post(INFER, small, b"Content-Length: 5\r\n", length=False),
            None,
        ),
    ]:
        c.append(Case(id, data, fragment, "POST" if data.startswith(b"POST") else "GET"))
    # ---- bodies
    ok_header = {"inputs": [raw_input()], "outputs": [{"name": "probability"}]}
    for id, header, tail, fragment in [
        ("deep nesting", None, b"", "nested too deeply"),
        (
            "wrong element count",
            {"id": MARK, "inputs": [raw_input(parameters={}, data=[1.0, 2.0, 3.0])]},
            b"",
            "values for shape",
        ),
        (
            "string elements",
            {"inputs": [raw_input(parameters={}, data=[MARK] * 4)]},
            b"",
            "'raw'",
        ),
        (
            "nested garbage elements",
            {"inputs": [raw_input(parameters={}, data=[[{"a": MARK}], [None]])]},
            b"",
            "'raw'",
        ),
        (
            "ragged elements",
            {"inputs": [raw_input(parameters={}, data=[[1, 2], [3]])]},
            b"",
            "'raw'",
        ),
        (
            "data not a list",
            {"inputs": [raw_input(parameters={}, data=MARK)]},
            b"",
            "must be a list",
        ),
        ("NaN in shape", {"inputs": [raw_input(shape=[1, 1, float("nan"), 512])]}, TENSOR, "shape"),
        (
            "NaN elements",
            {"inputs": [raw_input(parameters={}, data=[float("nan")] * 7)]},
            b"",
            "values for shape",
        ),
        (
            "huge number in shape",
            {"inputs": [raw_input(shape=[1, 1, 10**30, 512])]},
            TENSOR,
            "shape",
        ),
        (
            "infinite shape",
            {"inputs": [raw_input(shape=[1, 1, float("inf"), 512])]},
            TENSOR,
            "shape",
        ),
        ("negative shape", {"inputs": [raw_input(shape=[1, 1, -512, -512])]}, TENSOR, "shape"),
        (
            "huge binary_data_size",
            {"inputs": [raw_input(parameters={"binary_data_size": 10**30})]},
            TENSOR,
            "binary_data_size",
        ),
        (
            "infinite binary_data_size",
            {"inputs": [raw_input(parameters={"binary_data_size": float("inf")})]},
            TENSOR,
            "binary_data_size",
        ),
        (
            "binary_data_size too small",
            {"inputs": [raw_input(parameters={"binary_data_size": NBYTES - 4})]},
            TENSOR[:-4],
            "binary_data_size",
        ),
        (
            "binary_data_size too large",
            {"inputs": [raw_input(parameters={"binary_data_size": NBYTES + 4})]},
            TENSOR + b"\0" * 4,
            "binary_data_size",
        ),
        (
            "negative binary_data_size",
            {"inputs": [raw_input(parameters={"binary_data_size": -1})]},
            TENSOR,
            "binary_data_size",
        ),
        ("body ends inside the tensor", ok_header, TENSOR[:-100], "ends before"),
        ("extra bytes after the tensor", ok_header, TENSOR + MARKB, "after the last tensor"),
        ("binary data and JSON data", {"inputs": [raw_input(data=[1.0])]}, TENSOR, "both"),
        ("no data at all", {"inputs": [raw_input(parameters={})]}, b"", "neither"),
        ("unknown top-level field", {**ok_header, "sequence_id": MARK}, TENSOR, "unknown field"),
        (
            "unknown parameter",
            {**ok_header, "parameters": {MARK: 1}},
            TENSOR,
            "unsupported parameter",
        ),
        (
            "sequence parameters",
            {**ok_header, "parameters": {"sequence_id": 1, "sequence_start": True}},
            TENSOR,
            "unsupported parameter",
        ),
        (
            "shared memory input",
            {
                "inputs": [
                    raw_input(
                        parameters={"shared_memory_region": MARK, "shared_memory_byte_size": NBYTES}
                    )
                ]
            },
            b"",
            "binary_data_size",
        ),
        (
            "shared memory output",
            {
                "inputs": [raw_input()],
                "outputs": [{"name": "probability", "parameters": {"shared_memory_region": MARK}}],
            },
            TENSOR,
            "binary_data",
        ),
        (
            "shared memory top-level",
            {**ok_header, "parameters": {"shared_memory_region": MARK}},
            TENSOR,
            "unsupported parameter",
        ),
        (
            "classification output",
            {
                "inputs": [raw_input()],
                "outputs": [{"name": "probability", "parameters": {"classification": 3}}],
            },
            TENSOR,
            "binary_data",
        ),
        (
            "unknown output",
            {"inputs": [raw_input()], "outputs": [{"name": "nope" + MARK}]},
            TENSOR,
            "unknown output",
        ),
        (
            "output not an object",
            {"inputs": [raw_input()], "outputs": [MARK]},
            TENSOR,
            "unknown output",
        ),
        ("unknown input", {"inputs": [raw_input(name="rwa" + MARK)]}, TENSOR, "raw"),
        ("input name with CRLF", {"inputs": [raw_input(name="raw\r\nX: " + MARK)]}, TENSOR, "raw"),
        ("input given twice", {"inputs": [raw_input(), raw_input()]}, TENSOR + TENSOR, "twice"),
        (
            "wrong dtype",
            {"inputs": [raw_input(datatype="FP64", parameters={"binary_data_size": 2 * NBYTES})]},
            TENSOR + TENSOR,
            "dtype",
        ),
        ("BYTES dtype", {"inputs": [raw_input(datatype="BYTES")]}, TENSOR, "datatype"),
        ("datatype not a string", {"inputs": [raw_input(datatype=[MARK])]}, TENSOR, "datatype"),
        ("datatype an object", {"inputs": [raw_input(datatype={MARK: 1})]}, TENSOR, "datatype"),
        ("wrong shape", {"inputs": [raw_input(shape=[1, 4, 256, 256])]}, TENSOR, "axis"),
        ("too many dimensions", {"inputs": [raw_input(shape=[1] * 20)]}, TENSOR, "shape"),
        ("id with CRLF", {**ok_header, "id": "a\r\nX-Injected: " + MARK}, TENSOR, "'id'"),
        ("id too long", {**ok_header, "id": MARK * 20}, TENSOR, "'id'"),
        ("id not a string", {**ok_header, "id": {"a": MARK}}, TENSOR, "'id'"),
        ("negative timeout", {**ok_header, "parameters": {"timeout": -1}}, TENSOR, "timeout"),
        ("string timeout", {**ok_header, "parameters": {"timeout": MARK}}, TENSOR, "timeout"),
        ("no inputs", {"inputs": [], "id": MARK}, b"", "'inputs'"),
        ("inputs not a list", {"inputs": MARK}, b"", "'inputs'"),
        ("header not an object", [MARK], b"", "object"),
        ("null header", None, b"null", "object"),
    ]:
        if id == "deep nesting":
            body = MARKB + b"[" * 100_000
            c.append(Case(id, post(INFER, body, b""), "JSON", "POST"))
            body = b'{"id": "' + MARKB + b'", "inputs": ' + b"[" * 100_000
            c.append(Case(id + " in inputs", post(INFER, body, b""), fragment, "POST"))
            c.append(
                Case(
                    id + " with header length",
                    post(INFER, body, b"Inference-Header-Content-Length: %d\r\n" % len(body)),
                    fragment,
                    "POST",
                )
            )
            continue
        if id == "null header":
            c.append(Case(id, post(INFER, tail), fragment, "POST"))
            continue
        c.append(_body_case(id, header, tail, fragment))
    count = NBYTES // 4
    for id, odd in [
        ("a string among the right number of elements", b'"' + MARKB + b'"'),
        ("an object among the right number of elements", b'{"' + MARKB + b'": 1}'),
        ("a 400-digit integer among the right number of elements", b"9" * 400),
        ("true among the right number of elements", b"true"),
    ]:
        body = (
            b'{"inputs": [{"name": "raw", "shape": [1, 1, 512, 512], "datatype": "FP32", '
            b'"data": [' + b"0.5," * (count - 1) + odd + b"]}]}"
        )
        c.append(Case(id, post(INFER, body), "'raw'", "POST"))
    c.append(Case("empty body", post(INFER, b""), "JSON", "POST"))
    c.append(Case("non-UTF-8 JSON", post(INFER, b'{"id": "\xff\xfe' + MARKB + b'"}'), "", "POST"))
    c.append(Case("UTF-16 JSON", post(INFER, '{"id": "MARK"}'.encode("utf-16")), "", "POST"))
    c.append(
        Case("JSON with trailing garbage", post(INFER, b'{"inputs": []}' + MARKB), "JSON", "POST")
    )
    c.append(
        Case(
            "huge integer in JSON", post(INFER, b'{"id": ' + b"9" * 100_000 + b"}"), "JSON", "POST"
        )
    )
    c.append(
        Case(
            "scale body",
            post("/bioengine/scale", b'{"replicas": "' + MARKB + b'"}'),
            "replicas",
            "POST",
        )
    )
    c.append(Case("scale deep nesting", post("/bioengine/scale", b"[" * 60_000), "JSON", "POST"))
    c.append(Case("scale body too large", post("/bioengine/scale", MARKB * 3000), "", "POST"))
    # ---- methods on infer routes (and the unload route)
    for path in (INFER, f"{VERSIONED}/1/infer"):
        for method in ("HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "GET"):
            data = post(path, small, method=method.encode())
            c.append(Case(f"{method} {path}", data, "" if method != "HEAD" else None, method))
    for method in ("PUT", "DELETE", "GET", "HEAD"):
        c.append(
            Case(
                f"{method} unload",
                post(UNLOAD, small, method=method.encode()),
                None if method == "HEAD" else "",
                method,
            )
        )
    c.append(
        Case(
            "CONNECT", b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n", "", "CONNECT"
        )
    )
    c.append(Case("unknown method", post(INFER, small, method=b"FOO"), None, "POST"))
    c.append(Case("lower-case method", post(INFER, small, method=b"post"), None, "POST"))
    # ---- malformed HTTP
    for id, data in [
        ("garbage request line", b"GARBAGE\r\n\r\n"),
        ("binary garbage", bytes(range(256)) * 4 + b"\r\n\r\n"),
        ("TLS client hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64),
        ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
        ("HTTP/9.9", get(f"/v2/models/{M}", version=b"HTTP/9.9")),
        ("HTTP/1.1 with no version", b"GET /v2/models/" + M.encode() + b" HTTP/\r\n\r\n"),
        ("tabs", b"GET\t/v2/models/" + M.encode() + b"\tHTTP/1.1\r\nHost: x\r\n\r\n"),
        ("no path", b"GET HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("relative path", get(f"v2/models/{M}")),
        ("bare LF line ends", f"GET /v2/models/{M} HTTP/1.1\nHost: x\n\n".encode()),
        ("header without colon", get(f"/v2/models/{M}", b"NoColonHere\r\n")),
    ]:
        c.append(Case(id, data, None))
    c.append(
        Case(
            "HTTP/1.0 with a body",
            post(INFER, b'{"id": "' + MARKB + b'", "inputs": 5}', version=b"HTTP/1.0", close=False),
            "'inputs'",
            "POST",
        )
    )
    c.append(
        Case(
            "HTTP/1.0 with a body and no length",
            post(
                INFER, b'{"id": "' + MARKB + b'"}', version=b"HTTP/1.0", close=False, length=False
            ),
            None,
            "POST",
        )
    )
    c.append(
        Case(
            "absolute-form target with injected version",
            get(f"http://evil.example{VERSIONED}/1%0a"),
            "version",
        )
    )
    return c


CORPUS = corpus()


def _ids(cases: list[Case]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for case in cases:
        n = seen.get(case.id, 0)
        seen[case.id] = n + 1
        out.append(case.id if not n else f"{case.id} #{n + 1}")
    return out


@pytest.mark.parametrize("case", CORPUS, ids=_ids(CORPUS))
def test_raw_injection_gets_a_4xx(served, case):
    (answer,) = exchange(served.port, case.data, methods=(case.method,))
    check_4xx(answer, case.fragment, case.id)
    assert_alive(served)


# ----------------------------------------------------------------------------- http.client
def _client_cases() -> list[tuple[str, str, str, bytes | None, dict[str, str], str]]:
    hl = "Inference-Header-Content-Length"
    small = b'{"id": "' + MARKB + b'"}'
    cases = []
    for version in (
        "1%0d%0aGET%20/v2/repository/models/x/unload",
        "-1",
        "1.0",
        "99999999999",
        "1%0a",
        "%2e%2e",
    ):
        fragment = "" if "/" in version else "version"  # a '/' in it: no route matches
        cases.append((f"version {version}", "GET", f"{VERSIONED}/{version}", None, {}, fragment))
        cases.append(
            (
                f"version {version} infer",
                "POST",
                f"{VERSIONED}/{version}/infer",
                small,
                {},
                fragment,
            )
        )
    for path, fragment in [
        (f"/v2/models/{M}%0d%0a", "unknown model"),
        ("/v2/models/%2e%2e%2f%2e%2e%2fhealth", "unknown model"),
        ("/v2/models/%F0%9F%A7%AC", "unknown model"),
        ("/v2/models/" + "b" * 7000, "unknown model"),
    ]:
        cases.append((f"path {path[:60]}", "GET", path, None, {}, fragment))
    for method in ("HEAD", "PUT", "DELETE", "OPTIONS", "PATCH"):
        cases.append(
            (f"{method} infer", method, INFER, small, {}, "" if method != "HEAD" else None)
        )
    for value in ("-1", "0", "abc", "99999999999999999999", "1000", " 3 "):
        cases.append(
            (
                f"header length {value!r}",
                "POST",
                INFER,
                small,
                {hl: value},
                hl if value != " 3 " else "",
            )
        )
    body, line = jbody({"inputs": [raw_input()]}, TENSOR + MARKB)
    cases.append(
        (
            "extra bytes",
            "POST",
            INFER,
            body,
            {hl: line.split(b": ")[1].strip().decode()},
            "after the last tensor",
        )
    )
    cases.append(
        ("compressed", "POST", INFER, small, {"Content-Encoding": "deflate"}, "compressed")
    )
    cases.append(("bad token", "POST", INFER, small, {"Authorization": "Bearer nope"}, "token"))
    cases.append(
        ("basic auth", "POST", INFER, small, {"Authorization": "Basic bm9wZTpub3Bl"}, "token")
    )
    return cases


CLIENT_CASES = _client_cases()


@pytest.mark.parametrize(
    "id, method, path, body, headers, fragment", CLIENT_CASES, ids=[c[0] for c in CLIENT_CASES]
)
def test_http_client_injection_gets_a_4xx(served, id, method, path, body, headers, fragment):
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    try:
        conn.request(method, path, body, headers)
        resp = conn.getresponse()
        answer = Answer(resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read())
    finally:
        conn.close()
    check_4xx(answer, fragment, id)
    assert_alive(served)


# ----------------------------------------------------------------------------- pipelining
def _infer_request(body: bytes, hl: int, *, close: bool = False) -> bytes:
    return post(INFER, body, b"Inference-Header-Content-Length: %d\r\n" % hl, close=close)


def _keepalive_get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


def test_pipelined_requests_get_their_own_answers_in_order(served):
    injected = f"{VERSIONED}/1%0d%0aGET%20{UNLOAD.replace('/', '%2f')}"
    data = b"".join(
        [
            _keepalive_get(f"/v2/models/{M}"),
            _keepalive_get(injected),
            _infer_request(BODY_X, HL_X),
            _keepalive_get(f"/v2/models/{M}/versions/1%0d%0a"),
            _infer_request(BODY_X2, HL_X2),
            post(INFER, b'{"id": "' + MARKB + b'"}', close=False),
            _infer_request(BODY_X, HL_X),
            _keepalive_get(f"/v2/models/{M}/versions/1%0a/ready"),
            _keepalive_get("/v2/health/live"),
            _keepalive_get(f"/v2/models/{M}/ready"),
        ]
    )
    methods = ("GET", "GET", "POST", "GET", "POST", "POST", "POST", "GET", "GET", "GET")
    answers = exchange(served.port, data, methods=methods, timeout=300)
    assert answers[0].status == 200 and json.loads(answers[0].body)["name"] == M
    check_4xx(answers[1], "version", "pipelined version injection")
    _, out = parse_infer(answers[2].status, answers[2].headers, answers[2].body)
    np.testing.assert_allclose(out, served.expected["x"], atol=1e-5, rtol=0)
    check_4xx(answers[3], "version", "pipelined version 1%0d%0a")
    _, out = parse_infer(answers[4].status, answers[4].headers, answers[4].body)
    np.testing.assert_allclose(out, served.expected["x2"], atol=1e-5, rtol=0)
    check_4xx(answers[5], "'inputs'", "pipelined malformed body")
    _, out = parse_infer(answers[6].status, answers[6].headers, answers[6].body)
    np.testing.assert_allclose(out, served.expected["x"], atol=1e-5, rtol=0)
    check_4xx(answers[7], "version", "pipelined version 1%0a")
    assert answers[8].status == 200 and answers[9].status == 200


def test_smuggled_request_after_content_length_is_a_request_of_its_own(served):
    """Bytes after a body's Content-Length are the next request on the connection (answered
    in turn), never part of an upstream request."""
    smuggled = _keepalive_get(f"{VERSIONED}/1%0d%0aGET%20{UNLOAD.replace('/', '%2f')}")
    body = b'{"id": "' + MARKB + b'"}'
    data = post(INFER, body, close=False) + smuggled + _keepalive_get(f"/v2/models/{M}/ready")
    answers = exchange(served.port, data, methods=("POST", "GET", "GET"))
    check_4xx(answers[0], "'inputs'", "body before a smuggled request")
    check_4xx(answers[1], "version", "smuggled version injection")
    assert answers[2].status == 200


def test_garbage_after_a_good_request_is_answered_after_it(served):
    data = _infer_request(BODY_X2, HL_X2) + b"GARBAGE " + MARKB + b"\r\n\r\n"
    answers = exchange(served.port, data, methods=("POST", "GET"), timeout=300)
    _, out = parse_infer(answers[0].status, answers[0].headers, answers[0].body)
    np.testing.assert_allclose(out, served.expected["x2"], atol=1e-5, rtol=0)
    check_4xx(answers[1], None, "garbage after a request")


def test_request_sent_byte_by_byte_is_answered(served):
    data = get(f"{VERSIONED}/1%0d%0aGET%20{UNLOAD.replace('/', '%2f')}")
    with socket.create_connection(("127.0.0.1", served.port), timeout=60) as sock:
        for i in range(len(data)):
            sock.sendall(data[i : i + 1])
        answer = read_answer(socket_reader(sock))
    check_4xx(answer, "version", "byte by byte")


def test_body_shorter_than_content_length_then_eof_is_no_5xx(served):
    """A client that half-closes inside its body gets a 4xx or a closed connection (it said it
    will send nothing more), never a 5xx; the server stays up."""
    data = post(INFER, b'{"id": "' + MARKB + b'"', b"Content-Length: 1000\r\n", length=False)
    with socket.create_connection(("127.0.0.1", served.port), timeout=60) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        try:
            answer = read_answer(socket_reader(sock), "POST")
        except (http.client.RemoteDisconnected, ConnectionResetError):
            answer = None
    if answer is not None:
        check_4xx(answer, "", "body shorter than its Content-Length")
    assert_alive(served)


# ----------------------------------------------------------------------------- aftermath
def test_replica_models_are_unchanged_after_the_corpus(served):
    assert_alive(served)
    assert replica_models(served.url) == served.replicas_before


NOISE = [
    get(f"{VERSIONED}/1%0d%0aGET%20{UNLOAD}"),
    get(f"{VERSIONED}/1%0d%0aGET%20{UNLOAD.replace('/', '%2f')}"),
    get(f"{VERSIONED}/1%0a"),
    get(f"/v2/models/{M}\r\nGET {UNLOAD} HTTP/1.1".encode()),
    post(INFER, b'{"id": "' + MARKB + b'"}', close=False) + get(UNLOAD),
    post(INFER, b"[" * 100_000),
    b"GARBAGE\r\n\r\n",
]


def serve_log_tail(s: Served, lines: int = 40) -> str:
    return "\n".join(line[:300] for line in s.serve.lines[-lines:])


@pytest.mark.timeout(1800)
def test_a_thousand_requests_each_get_their_own_answer(served):
    """4 threads, fresh and keep-alive connections, inputs alternating between two images,
    while a fifth thread keeps sending injection attempts."""
    expected = served.expected
    results: list[tuple[str, str, str | None, float]] = []
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    per_thread = N_REQUESTS // 4

    def worker(t: int) -> int:
        reuse = t % 2 == 0
        conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=300)
        reconnects = 0
        last_sock = None
        try:
            for k in range(per_thread):
                name = "x" if (t + k) % 2 == 0 else "x2"
                request_id = f"t{t}-r{k}-{name}"
                if not reuse:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=300)
                try:
                    status, headers, data = infer_raw(conn, X if name == "x" else X2, request_id)
                except (http.client.HTTPException, OSError) as exc:
                    with lock:
                        failures.append(f"{request_id}: {exc!r}")
                    conn.close()
                    continue
                if status != 200:
                    with lock:
                        failures.append(f"{request_id}: {status} {data[:200]!r}")
                    continue
                got_id, out = parse_infer(status, headers, data)
                if reuse and k > 0 and conn.sock is not last_sock:
                    reconnects += 1
                last_sock = conn.sock
                err = float(np.abs(out - expected[name]).max())
                with lock:
                    results.append((request_id, name, got_id, err))
        finally:
            conn.close()
        return reconnects

    def noise() -> int:
        sent = 0
        while not stop.is_set():
            for data in NOISE:
                try:
                    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as s:
                        s.sendall(data)
                        while s.recv(65536):
                            pass
                except OSError:
                    pass
                sent += 1
            time.sleep(0.25)
        return sent

    started = time.monotonic()
    with ThreadPoolExecutor(5) as pool:
        noisy = pool.submit(noise)
        workers = [pool.submit(worker, t) for t in range(4)]
        try:
            reconnects = [w.result() for w in workers]
        finally:
            stop.set()
        sent = noisy.result()
    elapsed = time.monotonic() - started
    wrong_id = [(rid, got) for rid, _, got, _ in results if got != rid]
    assert not wrong_id, f"{len(wrong_id)} answers carried another request's id: {wrong_id[:5]}"
    wrong = [(rid, err) for rid, _, _, err in results if err > 1e-5]
    assert not wrong, f"{len(wrong)} answers were not their request's: {wrong[:5]}"
    assert not failures, (
        f"{len(failures)} of {N_REQUESTS} requests got no answer: {failures[:5]}\n"
        f"serve's log ends with:\n{serve_log_tail(served)}"
    )
    assert len(results) == N_REQUESTS
    assert sum(reconnects) <= N_REQUESTS // 20, (
        f"keep-alive connections were not reused: {reconnects}"
    )
    assert sent > 0
    print(f"{N_REQUESTS} requests in {elapsed:.1f} s, {sent} injection attempts alongside")


def test_replica_models_are_unchanged_at_the_end(served):
    """The same two replicas (none replaced), each with the same models loaded."""
    assert_alive(served)
    assert replica_models(served.url) == served.replicas_before, serve_log_tail(served)


def test_log_holds_no_body_bytes_and_no_overlong_line(served):
    time.sleep(1.0)  # let the reader thread collect the last lines
    output = served.serve.output
    assert MARK not in output, [line[:300] for line in output.splitlines() if MARK in line][:5]
    long_lines = [line[:200] for line in output.splitlines() if len(line) > MAX_LOG_LINE]
    assert not long_lines, long_lines[:3]
