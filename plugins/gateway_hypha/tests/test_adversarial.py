"""The Hypha gateway under attack: hostile bodies on the direct path, errors through Hypha RPC,
and secrets kept from the embedded server. Real Hypha server, real direct path, real sockets."""

from __future__ import annotations

import asyncio
import gzip
import io
import logging
import os
import re
import time
import zipfile

import aiohttp
import numpy as np
import psutil
import pytest
from bioengine_gateway_hypha.direct import pack_arrays
from bioengine_gateway_hypha.gateway import HyphaGateway
from bioengine_gateway_hypha.settings import HyphaGatewaySettings
from hypha_rpc import connect_to_server

from bioengine_core.errors import InferenceError

pytestmark = pytest.mark.hypha

LIMIT = 4 * 1024 * 1024  # direct_max_request_bytes of the gateway under test
RPC_LIMIT = 1024 * 1024  # rpc_max_input_bytes
IMAGE = np.arange(64, dtype=np.float32).reshape(1, 1, 8, 8)


@pytest.fixture
def faulty_service(toy_service):
    """The ToyService, whose `infer` raises `fail_with` when set (an engine bug, a timeout)."""
    original = toy_service.infer
    toy_service.fail_with = None

    async def infer(model_id, inputs, *, timeout=None):
        if toy_service.fail_with is not None:
            raise toy_service.fail_with
        return await original(model_id, inputs, timeout=timeout)

    toy_service.infer = infer
    return toy_service


@pytest.fixture
async def gateway(hypha_server, backend_context, faulty_service, monkeypatch):
    monkeypatch.setenv("ADV_HYPHA_TOKEN", hypha_server.root_token)
    settings = HyphaGatewaySettings(
        server_url=hypha_server.url,
        workspace="bioengine-adv",
        client_id="gw-adversarial",
        token_env="ADV_HYPHA_TOKEN",
        health_interval=0.5,
        direct_max_request_bytes=LIMIT,
        direct_read_timeout=1.0,
        direct_body_timeout=3.0,
        rpc_max_input_bytes=RPC_LIMIT,
    )
    gw = HyphaGateway(settings, backend_context)
    await gw.start(faulty_service)
    yield gw
    await gw.stop()


@pytest.fixture
async def svc(gateway, hypha_server):
    client = await connect_to_server({"server_url": hypha_server.url})
    yield await client.get_service("bioengine-adv/bioengine")
    await client.disconnect()


@pytest.fixture
async def direct(svc):
    """(url of /v1/infer/, headers with a fresh ticket, port) for the direct path."""
    access = await svc.get_direct_access()
    port = int(access["url"].rsplit(":", 1)[1])
    return access["url"] + "/v1/infer/", {"Authorization": f"Bearer {access['ticket']}"}, port


# --------------------------------------------------------------------------- building bodies


def npy(array: np.ndarray | None = None, *, header: dict | None = None, data: bytes = b"") -> bytes:
    """An .npy file: of `array`, or a hand-written `header` followed by raw `data`."""
    buf = io.BytesIO()
    if array is not None:
        np.save(buf, array, allow_pickle=array.dtype.hasobject)
    else:
        np.lib.format.write_array_header_1_0(buf, header)
        buf.write(data)
    return buf.getvalue()


def npz(members: dict[str, bytes], *, deflate: bool = False) -> bytes:
    """A zip of raw members (any names, stored or deflated)."""
    buf = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED
    with zipfile.ZipFile(buf, "w", compression=method) as zf:
        for name, content in members.items():
            zf.writestr(zipfile.ZipInfo(name), content, compress_type=method)
    return buf.getvalue()


def zip_bomb(inflated: int) -> bytes:
    """One deflated member `x.npy`: a valid header, then `inflated` bytes of zeros (~1000x)."""
    side = 8192
    rows = inflated // 4 // side
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        with zf.open("x.npy", "w", force_zip64=True) as fp:
            head = {"descr": "<f4", "fortran_order": False, "shape": (1, 1, rows, side)}
            fp.write(npy(header=head))
            chunk = bytes(1 << 20)
            for _ in range(rows * side * 4 // len(chunk)):
                fp.write(chunk)
    return buf.getvalue()


async def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.post(url, data=body, headers=headers) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, {"body": await resp.read()}


async def raw_request(port: int, head: str, parts=(), *, pause: float = 0.0) -> tuple[int, str]:
    """Send `head` (request line + headers) and body `parts` over a plain socket.

    Parts are sent in the background with `pause` seconds between them (a slow client);
    returns the status code and text of what the server answered before it closed.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        try:
            writer.write(head.replace("\n", "\r\n").encode() + b"\r\n")
            await writer.drain()
            for part in parts:
                writer.write(part)
                await writer.drain()
                if pause:
                    await asyncio.sleep(pause)
        except (ConnectionError, OSError):
            pass

    sender = asyncio.create_task(send())
    received = []
    try:
        async with asyncio.timeout(30):
            while block := await reader.read(65536):
                received.append(block)
    except ConnectionError:
        pass  # the server dropped the connection after answering
    finally:
        sender.cancel()
        writer.close()
    text = b"".join(received).decode(errors="replace")
    match = re.match(r"HTTP/1\.1 (\d+)", text)
    assert match, f"no HTTP answer: {text[:200]!r}"
    return int(match.group(1)), text


def head(path: str, ticket_headers: dict[str, str], *lines: str) -> str:
    auth = ticket_headers["Authorization"]
    extra = "".join(f"{line}\n" for line in lines)
    return f"POST {path} HTTP/1.1\nHost: 127.0.0.1\nAuthorization: {auth}\n{extra}"


def assert_clean(message: str) -> None:
    """An error message a caller may see: no traceback, no server file paths."""
    assert "Traceback" not in message, message
    assert ".py" not in message, message
    assert 'File "' not in message, message
    assert len(message.strip().splitlines()) == 1, message


# --------------------------------------------------------------------------- direct path


async def test_direct_path_accepts_a_valid_request(direct, faulty_service):
    url, auth, _ = direct
    status, answer = await post(url + "double", pack_arrays([IMAGE]), auth)
    assert status == 200
    with np.load(io.BytesIO(answer["body"])) as out:
        np.testing.assert_array_equal(out["y"], IMAGE * 2)
    # Shapes were checked (by tensor id, positional mapped) before the data was read.
    assert faulty_service.checked[-1] == ("double", {"x": ((1, 1, 8, 8), "float32")})
    # Big-endian and Fortran-ordered arrays are read correctly, keyed by tensor id.
    for array in (IMAGE.astype(">f4"), np.asfortranarray(IMAGE)):
        status, answer = await post(url + "double", npz({"x.npy": npy(array)}), auth)
        assert status == 200
        with np.load(io.BytesIO(answer["body"])) as out:
            np.testing.assert_array_equal(out["y"], IMAGE * 2)


async def test_missing_forged_or_expired_ticket_is_401(direct, gateway):
    url, auth, _ = direct
    body = pack_arrays([IMAGE])
    for headers in ({}, {"Authorization": "Bearer forged"}, {"Authorization": "Basic abc"}):
        status, answer = await post(url + "double", body, headers)
        assert status == 401 and "ticket" in answer["error"]
    ticket = auth["Authorization"][7:]
    expires, user = gateway._tickets._tickets[ticket]
    gateway._tickets._tickets[ticket] = (time.time() - 1, user)  # it expired
    status, answer = await post(url + "double", body, auth)
    assert status == 401 and "expired" in answer["error"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"not a zip at all", "not a .npz"),
        (pack_arrays([IMAGE])[:-10], "end of central directory"),
        (npz({"x.npy": b"hello, not an npy file"}), "not a valid .npy"),
        (npz({"x.npy": npy(IMAGE)[:-8]}), "holds"),
        (npz({}), "no arrays"),
    ],
    ids=["garbage", "truncated", "not-npy", "short-data", "empty"],
)
async def test_malformed_npz_is_400_naming_the_problem(direct, body, message):
    url, auth, _ = direct
    status, answer = await post(url + "double", body, auth)
    assert status == 400, answer
    assert message in answer["error"]
    assert_clean(answer["error"])


async def test_corrupt_data_is_400_after_the_shape_check(direct, faulty_service):
    url, auth, _ = direct
    big = np.ones((1, 1, 64, 64), np.float32)  # larger than zipfile's read-ahead of a header

    def corrupted(array: np.ndarray) -> bytes:  # data no longer matches its CRC
        body = npz({"x.npy": npy(array)})
        return body.replace(array.tobytes()[-16:], b"\xff" * 16)

    for array in (IMAGE, big):
        status, answer = await post(url + "double", corrupted(array), auth)
        assert status == 400 and "is corrupt" in answer["error"], answer
    # With a wrong shape the model check answers first: the data is not read before it.
    status, answer = await post(url + "double", corrupted(big.reshape(1, 2, 32, 64)), auth)
    assert status == 400 and "expected [1, 1, y, x]" in answer["error"], answer
    assert faulty_service.checked[-1] == ("double", {"x": ((1, 2, 32, 64), "float32")})


async def test_zip_bomb_is_refused_before_inflating(direct):
    url, auth, _ = direct
    inflated = 256 * 1024 * 1024
    bomb = zip_bomb(inflated)
    assert len(bomb) * 500 < inflated  # > 500x
    process = psutil.Process()
    before = process.memory_info().rss
    started = time.monotonic()
    status, answer = await post(url + "double", bomb, auth)
    elapsed = time.monotonic() - started
    grown = process.memory_info().rss - before
    assert status == 400 and "would inflate" in answer["error"], answer
    assert elapsed < 2.0
    assert grown < inflated // 10, f"RSS grew by {grown} bytes"
    # A bomb that stays under the size limit is refused by its ratio alone.
    small = npz({"x.npy": npy(np.zeros((1, 1, 512, 1024), np.float32))}, deflate=True)
    status, answer = await post(url + "double", small, auth)
    assert status == 400 and "would inflate" in answer["error"], answer


async def test_huge_declared_shape_is_refused_without_allocating(direct):
    url, auth, _ = direct
    header = {"descr": "<f4", "fortran_order": False, "shape": (1, 1, 10**6, 10**6)}
    process = psutil.Process()
    before = process.memory_info().rss
    status, answer = await post(
        url + "double", npz({"x.npy": npy(header=header, data=b"\0" * 64)}), auth
    )
    assert status == 400 and "declares shape [1, 1, 1000000, 1000000]" in answer["error"]
    assert process.memory_info().rss - before < 64 * 1024 * 1024
    for bad_shape in [(1, 1, -1, 8), (1,) * 40]:
        bad = {"descr": "<f4", "fortran_order": False, "shape": bad_shape}
        status, answer = await post(url + "double", npz({"x.npy": npy(header=bad)}), auth)
        assert status == 400, answer


@pytest.mark.parametrize(
    "name", ["../evil.npy", "a/b.npy", "/abs.npy", "x.txt", "x", ".npy", "..\\x.npy", "x y.npy"]
)
async def test_member_names_must_be_plain_npy_names(direct, name):
    url, auth, _ = direct
    status, answer = await post(url + "double", npz({name: npy(IMAGE)}), auth)
    assert status == 400 and "names must be NAME.npy" in answer["error"], answer


async def test_duplicate_and_unknown_members(direct):
    url, auth, _ = direct
    body = io.BytesIO()
    with zipfile.ZipFile(body, "w") as zf:
        zf.writestr("x.npy", npy(IMAGE))
        with pytest.warns(UserWarning):
            zf.writestr("x.npy", npy(IMAGE))
    status, answer = await post(url + "double", body.getvalue(), auth)
    assert status == 400 and "appears twice" in answer["error"]
    status, answer = await post(url + "double", npz({"z.npy": npy(IMAGE)}), auth)
    assert status == 400 and "missing input(s): x" in answer["error"]
    mixed = npz({"__pos_0.npy": npy(IMAGE), "x.npy": npy(IMAGE)})
    status, answer = await post(url + "double", mixed, auth)
    assert status == 400 and "positional" in answer["error"]
    status, answer = await post(url + "double", pack_arrays([IMAGE, IMAGE]), auth)
    assert status == 400 and "takes 1 input(s)" in answer["error"]


async def test_too_many_members(direct):
    url, auth, _ = direct
    body = npz({f"m{i}.npy": npy(IMAGE) for i in range(65)})
    status, answer = await post(url + "double", body, auth)
    assert status == 400 and "too many arrays" in answer["error"]


async def test_pickled_and_non_numeric_members_are_refused(direct):
    url, auth, _ = direct
    pickled = npy(np.array([{"__reduce__": "os.system"}], dtype=object))
    status, answer = await post(url + "double", npz({"x.npy": pickled}), auth)
    assert status == 400 and "object (pickled)" in answer["error"]
    text = npy(np.array(["a", "b"]))
    status, answer = await post(url + "double", npz({"x.npy": text}), auth)
    assert status == 400 and "not accepted" in answer["error"]
    status, answer = await post(url + "double", npz({"x.npy": npy(IMAGE.astype(np.float64))}), auth)
    assert status == 400 and "dtype float64" in answer["error"]


async def test_oversized_body_by_content_length_is_413_before_reading(direct):
    url, auth, port = direct
    request = head("/v1/infer/double", auth, f"Content-Length: {10**12}", "Connection: close")
    status, text = await raw_request(port, request)
    assert status == 413 and "direct_max_request_bytes" in text
    # With Expect: 100-continue the client is told before it sends anything.
    request = head("/v1/infer/double", auth, f"Content-Length: {LIMIT + 1}", "Expect: 100-continue")
    status, text = await raw_request(port, request)
    assert status == 413 and "100 Continue" not in text


async def test_oversized_chunked_body_is_cut_off_at_the_limit(direct):
    url, auth, port = direct
    chunk = b"\0" * 65536
    framed = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    parts = [framed] * (LIMIT // len(chunk) + 1)  # one chunk past the limit, never terminated
    request = head("/v1/infer/double", auth, "Transfer-Encoding: chunked")
    process = psutil.Process()
    before = process.memory_info().rss
    status, text = await raw_request(port, request, parts)
    assert status == 413 and "larger than the limit" in text
    assert process.memory_info().rss - before < 4 * LIMIT


async def test_compressed_bodies_are_415(direct):
    url, auth, port = direct
    body = gzip.compress(pack_arrays([IMAGE]))
    for encoding in ("gzip", "deflate", "br"):
        status, answer = await post(url + "double", body, {**auth, "Content-Encoding": encoding})
        assert status == 415 and "Content-Encoding" in answer["error"], answer


async def test_slow_bodies_hit_the_read_timeouts(direct):
    url, auth, port = direct
    # Stalls: 10 bytes of 1000, then nothing (direct_read_timeout = 1 s).
    request = head("/v1/infer/double", auth, "Content-Length: 1000")
    started = time.monotonic()
    status, text = await raw_request(port, request, [b"x" * 10])
    assert status == 408 and "not received in time" in text
    assert time.monotonic() - started < 5
    # Trickles: a byte every 0.3 s never pauses 1 s but exceeds direct_body_timeout = 3 s.
    started = time.monotonic()
    status, text = await raw_request(port, request, [b"x"] * 100, pause=0.3)
    assert status == 408
    assert 2.5 < time.monotonic() - started < 8


async def test_client_vanishing_mid_body_is_harmless(direct, caplog):
    url, auth, port = direct
    caplog.set_level(logging.WARNING)
    for framing in ("Content-Length: 1000", "Transfer-Encoding: chunked"):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        request = head("/v1/infer/double", auth, framing).replace("\n", "\r\n") + "\r\n"
        writer.write(request.encode() + b"5\r\nabc")
        await writer.drain()
        writer.close()
    await asyncio.sleep(0.5)
    assert not [r for r in caplog.records if r.name.startswith(("aiohttp", "bioengine"))]
    status, _ = await post(url + "double", pack_arrays([IMAGE]), auth)
    assert status == 200


async def test_bad_timeout_parameter_and_unknown_model(direct):
    url, auth, _ = direct
    for value in ("abc", "-1", "nan", "inf"):
        status, answer = await post(f"{url}double?timeout={value}", pack_arrays([IMAGE]), auth)
        assert status == 400 and "timeout must be" in answer["error"]
    status, answer = await post(url + "nope", pack_arrays([IMAGE]), auth)
    assert status == 404 and "unknown model 'nope'" in answer["error"]


async def test_direct_path_service_failures(direct, faulty_service, caplog):
    url, auth, _ = direct
    body = pack_arrays([IMAGE])
    faulty_service.fail_with = RuntimeError(f"bug in {__file__}")
    caplog.set_level(logging.ERROR, logger="bioengine.gateway.hypha")
    status, answer = await post(url + "double", body, auth)
    assert status == 500 and answer["type"] == "InternalError"
    ref = re.search(r"internal error \(ref ([0-9a-f]{8})\)", answer["error"]).group(1)
    assert_clean(answer["error"])
    assert any(ref in r.getMessage() and r.exc_info for r in caplog.records)
    faulty_service.fail_with = InferenceError("request timed out after 1 s", status=504)
    status, answer = await post(url + "double", body, auth)
    assert status == 504 and "timed out" in answer["error"]


def test_ticket_store_is_bounded():
    from bioengine_gateway_hypha.direct import Tickets

    tickets = Tickets(60, max_tickets=3)
    issued = [tickets.issue("mallory")[0] for _ in range(10)]
    assert len(tickets._tickets) == 3
    assert [tickets.check(t) for t in issued[-3:]] == ["mallory"] * 3
    assert tickets.check(issued[0]) is None


# --------------------------------------------------------------------------- Hypha RPC


async def rpc_error(call) -> str:
    with pytest.raises(Exception) as err:  # noqa: PT011 - hypha-rpc's RemoteException
        await call
    message = str(err.value)
    assert_clean(message)
    return message


async def test_rpc_errors_reach_the_caller_without_traceback(svc, faulty_service, caplog):
    assert "ModelNotFoundError: unknown model 'nope'" in await rpc_error(svc.infer("nope", [IMAGE]))
    message = await rpc_error(svc.infer("double", [IMAGE.reshape(1, 2, 4, 8)]))
    assert "InvalidInputError: input 'x': shape [1, 2, 4, 8]" in message
    message = await rpc_error(svc.infer("double", {"x": ["a", "b"]}))
    assert "is not accepted" in message
    message = await rpc_error(svc.infer("double"))  # missing argument
    assert "TypeError" in message and "inputs" in message
    assert "ModelNotFoundError" in await rpc_error(svc.get_model_rdf("nope"))  # sync function
    assert "PermissionError" in await rpc_error(svc.scale(3))

    caplog.set_level(logging.ERROR, logger="bioengine.gateway.hypha")
    faulty_service.fail_with = RuntimeError(f"secret detail in {__file__}")
    message = await rpc_error(svc.infer("double", [IMAGE]))
    ref = re.search(r"internal error \(ref ([0-9a-f]{8})\)", message).group(1)
    assert "secret detail" not in message
    logged = [r for r in caplog.records if ref in r.getMessage()]
    assert logged and logged[0].exc_info[0] is RuntimeError  # full traceback, server side

    faulty_service.fail_with = InferenceError("request timed out after 2 s", status=504)
    assert "TimeoutError: request timed out" in await rpc_error(svc.infer("double", [IMAGE]))
    faulty_service.fail_with = TimeoutError()
    assert "TimeoutError: the request timed out" in await rpc_error(svc.infer("double", [IMAGE]))


async def test_triton_client_errors_are_clean(gateway, hypha_server, faulty_service):
    client = await connect_to_server({"server_url": hypha_server.url})
    try:
        triton = await client.get_service("bioengine-adv/triton-client")
        assert "ModelNotFoundError" in await rpc_error(triton.get_config(model_name="nope"))
        assert "ModelNotFoundError" in await rpc_error(
            triton.execute(inputs=[IMAGE], model_name="x")
        )
        faulty_service.fail_with = RuntimeError(f"bug in {__file__}")
        answer = await triton.execute(
            inputs=[{"model_id": "double", "inputs": [IMAGE]}], model_name="bioengine-model-runner"
        )
        assert answer["result"]["success"] is False
        assert answer["result"]["error"].startswith("InternalError: internal error (ref ")
        assert_clean(answer["result"]["error"])
    finally:
        await client.disconnect()


async def test_rpc_inputs_over_the_limit_are_refused(svc, faulty_service):
    big = np.zeros((1, 1, 512, 1024), np.float32)  # 2 MiB > rpc_max_input_bytes
    message = await rpc_error(svc.infer("double", [big]))
    assert "RequestTooLargeError" in message and "rpc_max_input_bytes" in message
    assert faulty_service.checked == []  # refused before the service saw it


# --------------------------------------------------------------------------- embedded server


async def test_embedded_server_does_not_inherit_secrets(backend_context, toy_service, monkeypatch):
    from bioengine_gateway_hypha.server import hypha_installed

    from bioengine_core.testing.pytest_plugin import require_service

    require_service(hypha_installed(), "the Hypha server package (hypha[s3])")
    secrets = {
        "AWS_ACCESS_KEY_ID": "AKIA-test-key-id",
        "AWS_SECRET_ACCESS_KEY": "aws-secret-that-must-stay-home",
        "HYPHA_ADMIN_SECRET_FOR_TEST": "admin-secret-that-must-stay-home",
        "BIOENGINE_API_TOKEN": "api-token-that-must-stay-home",
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HYPHA_LOGLEVEL", "ERROR")  # an operator's Hypha option passes
    gw = HyphaGateway(
        HyphaGatewaySettings(
            embedded=True, admin_token_env="HYPHA_ADMIN_SECRET_FOR_TEST", direct=False
        ),
        backend_context,
    )
    await gw.start(toy_service)
    try:
        assert gw.info()["state"] == "connected"
        pid = gw.embedded.process.pid
        with open(f"/proc/{pid}/environ", "rb") as fh:
            raw = fh.read()
        env = dict(item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
        env = {k.decode(): v.decode() for k, v in env.items()}
    finally:
        await gw.stop()
    for name, value in secrets.items():
        assert name not in env and value.encode() not in raw, name
    assert env["HYPHA_ROOT_TOKEN"] == gw.embedded.root_token
    assert env["HYPHA_LOGLEVEL"] == "ERROR"
    assert env["PATH"] == os.environ["PATH"]
    assert gw.embedded.root_token not in " ".join(gw.embedded.command())


async def test_slow_or_idle_headers_are_closed(direct):
    """A connection that never completes its headers is closed after direct_read_timeout."""
    _, _, port = direct
    assert await headers_trickle_closed_within(port, 6.0)


async def headers_trickle_closed_within(port: int, limit: float) -> bool:
    """Trickle header bytes that never end; True once the server closed within `limit` s."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    started = time.monotonic()
    writer.write(b"POST /v1/infer/double HTTP/1.1\r\nHost: x\r\n")
    try:
        while time.monotonic() - started < limit:
            writer.write(b"X")
            await writer.drain()
            try:
                await asyncio.wait_for(reader.read(1024), 0.2)
                return True  # EOF or an error answer: the server gave up on us
            except TimeoutError:
                continue
    except ConnectionError:
        return True
    finally:
        writer.close()
    return False
