"""Property-based fuzzing of the KServe v2 request parser and the replica-answer check.

No Triton needed: `bioengine_core.kserve.parse_request` is called directly, with the bundled
model package (raw: 1x1x512x512 float32) and with small generated packages whose inputs have
variable axes and any numeric dtype, so shapes, dtypes and binary/JSON tensor data all vary.

Properties:
- whatever bytes, JSON header and Inference-Header-Content-Length a client sends, the parser
  answers quickly with a result or an InvalidInputError (a 400), never another exception;
- a valid request (tritonclient's own layout, binary or JSON tensors) is accepted, and
  `InferRequest.build()` writes a body that, read back in the tritonclient layout (a JSON header
  of the given length, then the binary tensors), holds exactly the same tensors, under an id of
  the gateway's own; the rebuilt body parses again to the same tensors;
- `check_response` accepts an answer carrying that id and the model's name with sizes that add
  up (restoring the client's id), and rejects any other (ProtocolError);
- the hop to a replica (`upstream._request_head`) refuses any path or header value that could
  end a line.
"""

from __future__ import annotations

import functools
import json
import math
import string
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as tc
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tritonclient.utils import np_to_triton_dtype

from bioengine_core.errors import InvalidInputError
from bioengine_core.kserve import (
    HEADER_LEN,
    InferRequest,
    ProtocolError,
    check_response,
    parse_request,
)
from bioengine_core.modelpkg import TensorSpec, load_package, validate_input_specs

ROOT = Path(__file__).resolve().parent.parent
MODEL_ID = "unet2d_nuclei_broad"
SHAPE = [1, 1, 512, 512]
NBYTES = math.prod(SHAPE) * 4
FAST = 2.0
"""Seconds any single parse may take (generous: a loaded CI machine)."""

FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = {
    "BOOL": np.dtype(bool),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
ALL_DATATYPES = [*DTYPES, "BYTES", "BF16", "fp32", "FLOAT", "", "STRING"]


@functools.cache
def real_package():
    return load_package(ROOT / "models" / MODEL_ID)


@pytest.fixture(scope="module", autouse=True)
def _package_loaded():
    """Load (and validate) the bundled package once, before any parse is timed."""
    real_package()


def real_parse(body: bytes, header_length: str | None) -> InferRequest:
    pkg = real_package()
    return parse_request(
        MODEL_ID,
        body,
        header_length,
        package=pkg,
        check=lambda specs: validate_input_specs(pkg, specs),
    )


@dataclass
class FakePackage:
    """What parse_request and validate_input_specs read of a model package."""

    id: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


def spec(name: str, dtype: np.dtype, ndim: int) -> TensorSpec:
    axes = ["batch", *(f"a{i}" for i in range(1, ndim))]
    return TensorSpec(
        id=name,
        dtype=dtype.name,
        shape=[-1] * ndim,
        axes=axes,
        has_batch=True,
        min_shape=[1] * ndim,
        step=[0] * ndim,
    )


@st.composite
def fake_packages(draw) -> FakePackage:
    names = draw(
        st.lists(
            st.text(string.ascii_letters + string.digits + "_", min_size=1, max_size=8),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    inputs = [
        spec(n, DTYPES[draw(st.sampled_from(list(DTYPES)))], draw(st.integers(1, 4))) for n in names
    ]
    outputs = [spec(f"out{i}", np.dtype(np.float32), 2) for i in range(draw(st.integers(1, 3)))]
    return FakePackage(id="tiny", inputs=inputs, outputs=outputs)


def fake_parse(pkg: FakePackage, body: bytes, header_length: str | None) -> InferRequest:
    return parse_request(
        pkg.id,
        body,
        header_length,
        package=pkg,
        check=lambda specs: validate_input_specs(pkg, specs),
    )


def timed(fn, *args):
    """fn(*args), asserting it returns or raises InvalidInputError within FAST seconds."""
    started = time.perf_counter()
    try:
        return fn(*args)
    except InvalidInputError as exc:
        assert exc.status == 400
        assert str(exc)
        return None
    finally:
        elapsed = time.perf_counter() - started
        assert elapsed < FAST, f"parse took {elapsed:.2f} s"


def read_tritonclient_layout(body: bytes, header_length: str) -> tuple[dict, dict[str, bytes]]:
    """A request body as Triton reads it: JSON header of the given length, then tensors."""
    hl = int(header_length)
    header = json.loads(body[:hl])
    tensors: dict[str, bytes] = {}
    offset = hl
    for item in header["inputs"]:
        size = item["parameters"]["binary_data_size"]
        assert "data" not in item
        tensors[item["name"]] = body[offset : offset + size]
        offset += size
    assert offset == len(body), "bytes after the last tensor"
    return header, tensors


# ----------------------------------------------------------------------------- strategies
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
header_lengths = st.one_of(
    st.none(),
    st.integers(-(2**40), 2**40).map(str),
    st.text(max_size=12),
    st.sampled_from(
        ["", " ", "0", "-0", "+1", "1_0", "0x10", "1e3", "1.5", "nan", "٣", "9" * 5000]
    ),
)
shapes = st.one_of(
    st.just(SHAPE),
    st.lists(st.integers(-2, 2**41), max_size=5),
    st.lists(st.integers(0, 600), min_size=1, max_size=20),
    json_values,
)
input_items = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["raw", "rwa", "", "raw\r\n"]) | json_values,
        "shape": shapes,
        "datatype": st.sampled_from(ALL_DATATYPES) | json_values,
        "parameters": st.fixed_dictionaries(
            {},
            optional={
                "binary_data_size": st.sampled_from([NBYTES, NBYTES - 1, 0, -1, 2**62])
                | json_values,
                "shared_memory_region": st.just("evil"),
                "shared_memory_byte_size": st.integers(0, 2**40),
                "shared_memory_offset": st.integers(-10, 10),
            },
        )
        | json_values,
        "data": st.lists(json_values, max_size=8) | json_values,
        "extra": json_values,
    },
)
headers_structured = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=300) | json_values,
        "inputs": st.lists(input_items, max_size=3) | json_values,
        "outputs": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "name": st.sampled_from(["probability", "nope"]) | json_values,
                    "parameters": st.fixed_dictionaries(
                        {},
                        optional={
                            "binary_data": st.booleans() | json_values,
                            "classification": st.integers(0, 5),
                            "shared_memory_region": st.just("evil"),
                        },
                    )
                    | json_values,
                },
            ),
            max_size=3,
        )
        | json_values,
        "parameters": st.dictionaries(
            st.sampled_from(
                ["timeout", "binary_data_output", "priority", "sequence_id", "shared_memory"]
            )
            | st.text(max_size=8),
            json_values,
            max_size=3,
        )
        | json_values,
        "model_name": json_values,
    },
)


def rarely(draw, percent: int = 10) -> bool:
    """True about `percent` % of the time (away from the ends hypothesis favours)."""
    return 40 <= draw(st.integers(0, 99)) < 40 + percent


def mostly(draw, good, bad, percent: int = 80):
    """`good` most of the time, else a value drawn from `bad`."""
    return draw(bad) if rarely(draw, 100 - percent) else good


@st.composite
def near_valid_headers(draw) -> dict:
    """A valid header for the bundled model (binary tensor) with a few parts made wrong."""
    item: dict = {
        "name": mostly(draw, "raw", st.sampled_from(["rwa", "", "raw\n", "RAW"]) | json_values),
        "shape": mostly(draw, SHAPE, shapes),
        "datatype": mostly(draw, "FP32", st.sampled_from(ALL_DATATYPES) | json_values),
        "parameters": {
            "binary_data_size": mostly(
                draw, NBYTES, st.sampled_from([NBYTES - 1, NBYTES + 1, 0, -1, True]) | json_values
            )
        },
    }
    if rarely(draw):
        item["parameters"][
            draw(st.sampled_from(["shared_memory_region", "shared_memory_byte_size", "x"]))
        ] = draw(json_values)
    if rarely(draw):
        item["data"] = draw(st.lists(json_values, max_size=4) | json_values)
    if rarely(draw):
        del item[draw(st.sampled_from(sorted(item)))]
    header: dict = {"inputs": [item]}
    if rarely(draw):
        header["inputs"] = draw(
            st.sampled_from([[], [item, item], [item, {**item, "name": "other"}], item])
        )
    if draw(st.booleans()):
        header["id"] = mostly(
            draw,
            draw(st.text(string.printable.strip() + " ", max_size=256)),
            st.text(max_size=300) | json_values,
        )
    if draw(st.booleans()):
        header["outputs"] = [
            {
                "name": mostly(draw, "probability", st.sampled_from(["nope", ""]) | json_values),
                "parameters": mostly(
                    draw,
                    {"binary_data": draw(st.booleans())},
                    st.dictionaries(
                        st.sampled_from(["binary_data", "classification", "shared_memory_region"]),
                        json_values,
                        max_size=2,
                    )
                    | json_values,
                ),
            }
            for _ in range(draw(st.integers(0, 2)))
        ]
    if draw(st.booleans()):
        header["parameters"] = draw(
            st.dictionaries(
                st.sampled_from(
                    ["timeout", "binary_data_output", "priority", "sequence_id", "shared_memory"]
                ),
                st.integers(-5, 2**64) | st.booleans() | json_values,
                max_size=3,
            )
        )
    if rarely(draw, 5):
        header[draw(st.sampled_from(["model_name", "sequence_id", "x"]))] = draw(json_values)
    return header


# ----------------------------------------------------------------------------- only 400s
@FUZZ
@given(body=st.binary(max_size=2048), header_length=header_lengths)
def test_arbitrary_bytes_give_400_or_nothing(body, header_length):
    timed(real_parse, body, header_length)


@FUZZ
@given(
    header=json_values,
    tail=st.binary(max_size=64),
    how=st.sampled_from(["exact", "none", "other"]),
    other=header_lengths,
)
def test_arbitrary_json_headers_give_400(header, tail, how, other):
    head = json.dumps(header).encode()
    body = head + tail
    length = {"exact": str(len(head)), "none": None, "other": other}[how]
    timed(real_parse, body, length)


@FUZZ
@given(
    header=headers_structured | near_valid_headers() | near_valid_headers(),
    tensor_bytes=st.sampled_from([0, NBYTES, NBYTES - 1, NBYTES + 3]),
    how=st.sampled_from(["exact", "none", "other"]),
    other=header_lengths,
)
def test_request_shaped_garbage_gives_400(header, tensor_bytes, how, other):
    head = json.dumps(header).encode()
    body = head + b"\x01" * tensor_bytes
    length = {"exact": str(len(head)), "none": None, "other": other}[how]
    request = timed(real_parse, body, length)
    if request is not None:
        # accepted: then it is a valid request for this model, and nothing else
        assert [t.name for t in request.inputs] == ["raw"]
        (raw,) = request.inputs
        assert raw.shape == SHAPE and raw.datatype == "FP32" and len(raw.data) == NBYTES
        assert set(header) <= {"id", "inputs", "outputs", "parameters"}
        assert request.nonce != request.client_id


@FEW
@given(pkg=fake_packages(), header=headers_structured, tail=st.binary(max_size=64))
def test_garbage_against_small_models_gives_400(pkg, header, tail):
    head = json.dumps(header).encode()
    timed(fake_parse, pkg, head + tail, str(len(head)))
    timed(fake_parse, pkg, head, None)


@pytest.mark.parametrize(
    "body, header_length, fragment",
    [
        (b"[" * 100_000, None, "nested too deeply"),
        (b'{"inputs": ' + b"[" * 100_000, None, "nested too deeply"),
        (b'{"inputs": [{"name": "raw", "data": ' + b"[" * 50_000 + b"]" * 50_000, None, ""),
        (b'{"id": ' + b"1" * 100_000 + b"}", None, "not valid JSON"),
        (b"\xff\xfe{}", None, ""),
        (b'{"id": "\xc3\x28"}', None, "not UTF-8"),
        (b"{}", "-1", "decimal number"),
        (b"{}", "0", "outside the body"),
        (b"{}", "3", "outside the body"),
        (b"{}", "abc", "decimal number"),
        (b"{}", "1" * 5000, ""),
        (b'{"inputs": []}' + b"\0" * (2 << 20), str(2 << 20), "larger than"),
        (b"{}" + b"\0" * 10, "2", "'inputs'"),
        (b'{"inputs": [], "shared_memory_region": "x"}', None, "unknown field"),
    ],
)
def test_pathological_bodies_are_refused_quickly(body, header_length, fragment):
    started = time.perf_counter()
    with pytest.raises(InvalidInputError) as info:
        real_parse(body, header_length)
    assert time.perf_counter() - started < FAST
    assert info.value.status == 400 and MODEL_ID in str(info.value)
    assert fragment in str(info.value)


def valid_header(**extra) -> dict:
    return {
        "inputs": [
            {
                "name": "raw",
                "shape": SHAPE,
                "datatype": "FP32",
                "parameters": {"binary_data_size": NBYTES},
            }
        ],
        **extra,
    }


@pytest.mark.parametrize(
    "header, tail, fragment",
    [
        (valid_header(), b"\0" * (NBYTES - 1), "ends before"),
        (valid_header(), b"\0" * (NBYTES + 1), "1 bytes after the last tensor"),
        (valid_header(parameters={"shared_memory_region": "r"}), b"\0" * NBYTES, "unsupported"),
        (valid_header(parameters={"timeout": -1}), b"\0" * NBYTES, "timeout"),
        (valid_header(parameters={"binary_data_output": "yes"}), b"\0" * NBYTES, "true or false"),
        (valid_header(outputs=[{"name": "nope"}]), b"\0" * NBYTES, "unknown output 'nope'"),
        (
            valid_header(outputs=[{"name": "probability", "parameters": {"class": 3}}]),
            b"\0" * NBYTES,
            "only parameters.binary_data",
        ),
        (valid_header(id="a\nb"), b"\0" * NBYTES, "'id'"),
        (valid_header(id="x" * 257), b"\0" * NBYTES, "'id'"),
        (valid_header(id=5), b"\0" * NBYTES, "'id'"),
    ],
)
def test_invalid_requests_name_the_problem(header, tail, fragment):
    head = json.dumps(header).encode()
    with pytest.raises(InvalidInputError) as info:
        real_parse(head + tail, str(len(head)))
    assert fragment in str(info.value)


@pytest.mark.parametrize("datatype", [[], ["FP32"], {}, {"FP32": 1}])
def test_unhashable_datatype_is_a_400(datatype):
    """`"datatype": []` (any JSON array or object) is a malformed request, not a 500."""
    header = valid_header()
    header["inputs"][0]["datatype"] = datatype
    head = json.dumps(header).encode()
    with pytest.raises(InvalidInputError) as info:
        real_parse(head + b"\0" * NBYTES, str(len(head)))
    assert "datatype" in str(info.value)


@pytest.mark.parametrize("client_id", ["abc\n", "abc\r\n", "\n", "ok\x00", "é"])
def test_client_id_must_be_printable_ascii(client_id):
    """'id' is echoed back to the client: only printable ASCII (no line ends) is accepted."""
    head = json.dumps(valid_header(id=client_id)).encode()
    with pytest.raises(InvalidInputError):
        real_parse(head + b"\0" * NBYTES, str(len(head)))


@pytest.mark.parametrize(
    "data, fragment",
    [
        ([1.0] * 3, "values for shape"),
        (["a"] * 4, "numbers"),
        ([[1, 2], [3]], ""),
        ([{"a": 1}] * 4, "numbers"),
        ([None] * 4, "numbers"),
        ([True, False, True, False], "numbers"),
        ([1e400] * 4, ""),
        ([10**30] * 4, ""),
        ("1234", "must be a list"),
    ],
)
def test_bad_json_tensor_data_for_small_model(data, fragment):
    pkg = FakePackage(
        "tiny", [spec("x", np.dtype(np.int32), 2)], [spec("y", np.dtype(np.int32), 2)]
    )
    head = json.dumps(
        {"inputs": [{"name": "x", "shape": [2, 2], "datatype": "INT32", "data": data}]}
    ).encode()
    with pytest.raises(InvalidInputError) as info:
        fake_parse(pkg, head, None)
    assert fragment in str(info.value) and "'x'" in str(info.value)


# ----------------------------------------------------------------------------- round trip
@st.composite
def valid_requests(draw):
    """A small generated model and a valid request for it, as tritonclient writes it."""
    pkg = draw(fake_packages())
    arrays: dict[str, np.ndarray] = {}
    inputs = []
    for s in pkg.inputs:
        shape = tuple(
            draw(st.lists(st.integers(1, 4), min_size=len(s.shape), max_size=len(s.shape)))
        )
        dtype = np.dtype(s.dtype)
        binary = draw(st.booleans())
        elements = None
        if dtype == np.uint64 and not binary:
            # values above 2**63 in JSON: test_uint64_json_data_above_int64_range
            elements = st.integers(0, 2**63 - 1)
        arr = draw(hnp.arrays(dtype, shape, elements=elements))
        arrays[s.id] = arr
        inp = tc.InferInput(s.id, list(shape), np_to_triton_dtype(dtype))
        inp.set_data_from_numpy(arr, binary_data=binary)
        inputs.append(inp)
    order = draw(st.permutations(range(len(inputs))))
    inputs = [inputs[i] for i in order]
    outputs = None
    if draw(st.booleans()):
        names = draw(
            st.lists(st.sampled_from([o.id for o in pkg.outputs]), unique=True, max_size=3)
        )
        outputs = [tc.InferRequestedOutput(n, binary_data=draw(st.booleans())) for n in names]
    client_id = draw(st.text(string.printable.strip() + " ", max_size=256) | st.just(""))
    timeout = draw(st.none() | st.integers(1, 10**9))
    body, json_size = tc.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, request_id=client_id, timeout=timeout
    )
    return pkg, arrays, body, json_size, client_id, timeout, outputs


@FUZZ
@given(case=valid_requests())
def test_valid_requests_round_trip(case):
    pkg, arrays, body, json_size, client_id, timeout, outputs = case
    length = None if json_size is None else str(json_size)
    request = fake_parse(pkg, body, length)
    assert request.client_id == (client_id or None)
    assert request.nonce.startswith("be-") and request.nonce != client_id
    assert request.timeout == (timeout / 1e6 if timeout else None)
    if not outputs:  # tritonclient sends no 'outputs' for an empty list
        assert request.outputs is None
    else:
        assert request.outputs == [(o.name(), o._parameters["binary_data"]) for o in outputs]

    parts, headers = request.build()
    assert set(headers) == {"Content-Type", HEADER_LEN}
    built = b"".join(bytes(p) for p in parts)
    header, tensors = read_tritonclient_layout(built, headers[HEADER_LEN])
    assert header["id"] == request.nonce
    assert set(header) <= {"id", "inputs", "outputs", "parameters"}
    assert sorted(tensors) == sorted(arrays)
    for item in header["inputs"]:
        arr = arrays[item["name"]]
        assert item["shape"] == list(arr.shape)
        assert item["datatype"] == np_to_triton_dtype(arr.dtype)
        got = np.frombuffer(tensors[item["name"]], dtype=arr.dtype).reshape(arr.shape)
        if arr.dtype.kind == "f":
            assert np.array_equal(got, arr, equal_nan=True)
        else:
            assert tensors[item["name"]] == np.ascontiguousarray(arr).tobytes()
    # what the client sent as binary comes through byte for byte (NaN payloads included)
    for item in json.loads(body[: json_size or len(body)])["inputs"]:
        if "data" not in item:
            assert tensors[item["name"]] == np.ascontiguousarray(arrays[item["name"]]).tobytes()
    if not outputs:
        assert "outputs" not in header
        assert header.get("parameters", {}).get("binary_data_output") is (
            True if request.binary_output else None
        )
    else:
        assert header["outputs"] == [
            {"name": o.name(), "parameters": {"binary_data": o._parameters["binary_data"]}}
            for o in outputs
        ]

    again = fake_parse(pkg, built, headers[HEADER_LEN])
    assert [(t.name, t.shape, t.datatype, bytes(t.data)) for t in again.inputs] == [
        (t.name, t.shape, t.datatype, bytes(t.data)) for t in request.inputs
    ]
    assert again.outputs == request.outputs and again.client_id == request.nonce


@pytest.mark.parametrize(
    "values", [[0, 2**63], [2**64 - 1, 1], [2**63 + 1, 2**62]], ids=["0,2^63", "max,1", "mixed"]
)
def test_uint64_json_data_above_int64_range(values):
    """UINT64 JSON data is exact for every uint64 value, also next to values below 2**63
    (what tritonclient's `set_data_from_numpy(..., binary_data=False)` sends)."""
    pkg = FakePackage("tiny", [spec("x", np.dtype(np.uint64), 1)], [])
    arr = np.array(values, dtype=np.uint64)
    inp = tc.InferInput("x", [len(values)], "UINT64")
    inp.set_data_from_numpy(arr, binary_data=False)
    body, json_size = tc.InferenceServerClient.generate_request_body([inp])
    assert json_size is None
    request = fake_parse(pkg, body, None)
    assert bytes(request.inputs[0].data) == arr.tobytes()


@FUZZ
@given(
    case=valid_requests(),
    field=st.sampled_from(["data", "data-element", "shape", "datatype", "parameters", "name"]),
    garbage=json_values,
    nan=st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999", b"1" * 400]),
    inject_number=st.booleans(),
)
def test_mutated_valid_requests_give_400(case, field, garbage, nan, inject_number):
    """One part of a valid request made wrong (JSON data elements included: strings, objects,
    NaN, huge numbers, ragged lists): accepted only when still valid, else a 400."""
    pkg, arrays, body, json_size, *_ = case
    hl = json_size or len(body)
    header = json.loads(body[:hl])
    item = header["inputs"][0]
    if field == "data-element" and isinstance(item.get("data"), list) and item["data"]:
        item["data"][0] = garbage
    elif field == "data":
        item["data"] = garbage
    else:
        item[field] = garbage
    head = json.dumps(header).encode()
    if inject_number and b"[" in head:
        head = head.replace(b"[", b"[" + nan + b",", 1)
    request = timed(fake_parse, pkg, head + body[hl:], str(len(head)) if json_size else None)
    if request is not None:
        for t in request.inputs:
            dtype = DTYPES[t.datatype]
            assert len(t.data) == math.prod(t.shape) * dtype.itemsize


def test_real_model_request_round_trips_and_gets_a_fresh_nonce():
    x = np.load(ROOT / "models" / MODEL_ID / "test_input.npy")
    inp = tc.InferInput("raw", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    body, json_size = tc.InferenceServerClient.generate_request_body(
        [inp], outputs=[tc.InferRequestedOutput("probability")], request_id="mine"
    )
    nonces = set()
    for _ in range(50):
        request = real_parse(body, str(json_size))
        parts, headers = request.build()
        header, tensors = read_tritonclient_layout(
            b"".join(bytes(p) for p in parts), headers[HEADER_LEN]
        )
        assert tensors == {"raw": x.tobytes()}
        assert header["id"] == request.nonce and request.client_id == "mine"
        nonces.add(request.nonce)
    assert len(nonces) == 50


# ----------------------------------------------------------------------------- answers
def answer(request: InferRequest, outputs: list[np.ndarray], **override) -> tuple[bytes, dict]:
    """A replica's binary answer to `request` (Triton's layout)."""
    header = {
        "id": request.nonce,
        "model_name": request.model,
        "model_version": "1",
        "outputs": [
            {
                "name": f"out{i}",
                "datatype": np_to_triton_dtype(arr.dtype),
                "shape": list(arr.shape),
                "parameters": {"binary_data_size": arr.nbytes},
            }
            for i, arr in enumerate(outputs)
        ],
    }
    header.update(override)
    head = json.dumps(header).encode()
    return head + b"".join(a.tobytes() for a in outputs), {HEADER_LEN.lower(): str(len(head))}


small_arrays = st.lists(
    hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=4)), min_size=0, max_size=3
)


@st.composite
def requests_for_tiny(draw):
    pkg = FakePackage("tiny", [spec("x", np.dtype(np.float32), 2)], [])
    x = draw(hnp.arrays(np.float32, (1, draw(st.integers(1, 5)))))
    client_id = draw(st.none() | st.text(string.ascii_letters, min_size=1, max_size=20))
    header = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32"}]}
    header["inputs"][0]["parameters"] = {"binary_data_size": x.nbytes}
    if client_id is not None:
        header["id"] = client_id
    head = json.dumps(header).encode()
    return fake_parse(pkg, head + x.tobytes(), str(len(head)))


@FUZZ
@given(request=requests_for_tiny(), outputs=small_arrays)
def test_check_response_accepts_its_answer_and_restores_the_client_id(request, outputs):
    data, headers = answer(request, outputs)
    body, out_headers = check_response(request, 200, data, headers)
    if any(a.nbytes for a in outputs):
        hl = int(out_headers[HEADER_LEN])
        assert out_headers["Content-Type"] == "application/octet-stream"
    else:
        hl = len(body)
    header = json.loads(body[:hl])
    assert header.get("id") == request.client_id
    assert request.nonce not in body[:hl].decode()
    assert body[hl:] == b"".join(a.tobytes() for a in outputs)
    result = tc.InferenceServerClient.parse_response_body(
        body, header_length=int(out_headers[HEADER_LEN]) if HEADER_LEN in out_headers else None
    )
    for i, arr in enumerate(outputs):
        assert np.array_equal(result.as_numpy(f"out{i}"), arr, equal_nan=True)


@FUZZ
@given(
    request=requests_for_tiny(),
    outputs=small_arrays,
    other_id=st.none() | st.text(max_size=30) | st.integers() | st.just("be-0000000000000000"),
)
def test_check_response_rejects_another_id(request, outputs, other_id):
    assume(other_id != request.nonce)
    data, headers = answer(request, outputs, id=other_id)
    with pytest.raises(ProtocolError):
        check_response(request, 200, data, headers)
    data, headers = answer(request, outputs)
    head = json.loads(data[: int(headers[HEADER_LEN.lower()])])
    del head["id"]
    raw = json.dumps(head).encode()
    with pytest.raises(ProtocolError):
        check_response(request, 200, raw + data[len(data) - sum(a.nbytes for a in outputs) :], {})


@FUZZ
@given(request=requests_for_tiny(), outputs=small_arrays, other=st.text(max_size=30) | json_values)
def test_check_response_rejects_another_model(request, outputs, other):
    assume(other != request.model)
    data, headers = answer(request, outputs, model_name=other)
    with pytest.raises(ProtocolError):
        check_response(request, 200, data, headers)


@FUZZ
@given(
    request=requests_for_tiny(),
    outputs=small_arrays.filter(lambda a: len(a) > 0),
    delta=st.integers(-64, 64).filter(bool),
    where=st.sampled_from(["tail", "size", "header_length"]),
)
def test_check_response_rejects_sizes_that_do_not_add_up(request, outputs, delta, where):
    data, headers = answer(request, outputs)
    hl = int(headers[HEADER_LEN.lower()])
    if where == "tail":
        assume(delta > 0 or -delta <= len(data) - hl)
        data = data + b"\0" * delta if delta > 0 else data[:delta]
    elif where == "size":
        out = json.loads(data[:hl])
        out["outputs"][0]["parameters"]["binary_data_size"] += delta
        head = json.dumps(out).encode()
        data = head + data[hl:]
        headers = {HEADER_LEN.lower(): str(len(head))}
    else:
        headers = {HEADER_LEN.lower(): str(hl + delta)}
    with pytest.raises(ProtocolError):
        check_response(request, 200, data, headers)


@FUZZ
@given(
    request=requests_for_tiny(),
    data=st.binary(max_size=512),
    header_length=st.none() | header_lengths.filter(lambda v: v is not None),
)
def test_check_response_on_garbage_raises_protocol_error(request, data, header_length):
    headers = {} if header_length is None else {HEADER_LEN.lower(): header_length}
    with pytest.raises(ProtocolError):
        check_response(request, 200, data, headers)


@FUZZ
@given(request=requests_for_tiny(), outputs_field=json_values, tail=st.binary(max_size=16))
def test_check_response_on_malformed_outputs_accepts_or_raises_protocol_error(
    request, outputs_field, tail
):
    """A replica answer with the right id and model but a malformed 'outputs' is a protocol
    error (the router then retries elsewhere), never another exception (a 500)."""
    head = json.dumps(
        {"id": request.nonce, "model_name": request.model, "outputs": outputs_field}
    ).encode()
    try:
        check_response(request, 200, head + tail, {HEADER_LEN.lower(): str(len(head))})
    except ProtocolError:
        pass


@pytest.mark.parametrize(
    "outputs_field",
    [
        True,
        5,
        "abc",
        {"a": 1},
        [None],
        [1],
        [{"parameters": {"binary_data_size": "x"}}],
        [{"parameters": {"binary_data_size": [5]}}],
        [{"parameters": "abc"}],
    ],
)
def test_check_response_on_malformed_outputs_raises_protocol_error(outputs_field):
    pkg = FakePackage("tiny", [spec("x", np.dtype(np.float32), 1)], [])
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "shape": [1],
                    "datatype": "FP32",
                    "parameters": {"binary_data_size": 4},
                }
            ]
        }
    ).encode()
    req = fake_parse(pkg, head + b"\0" * 4, str(len(head)))
    answer = json.dumps({"id": req.nonce, "model_name": "tiny", "outputs": outputs_field}).encode()
    with pytest.raises(ProtocolError):
        check_response(req, 200, answer, {HEADER_LEN.lower(): str(len(answer))})


def test_check_response_on_deeply_nested_answer_raises_protocol_error():
    pkg = FakePackage("tiny", [spec("x", np.dtype(np.float32), 1)], [])
    head = json.dumps({"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}).encode()
    head = head.replace(b'"FP32"}', b'"FP32", "parameters": {"binary_data_size": 4}}')
    req = fake_parse(pkg, head + b"\0" * 4, str(len(head)))
    with pytest.raises(ProtocolError):
        check_response(req, 200, b"[" * 100_000, {})


# ----------------------------------------------------------------------------- upstream hop
LINE_BREAKERS = ["\n", "\r", "\r\n", "\x00", "\x0b", "\x0c", "\x85", "\u2028"]


@pytest.mark.parametrize("breaker", LINE_BREAKERS)
@pytest.mark.parametrize("where", ["end", "middle"])
def test_upstream_refuses_paths_and_headers_that_could_end_a_line(breaker, where):
    from bioengine_core.upstream import _request_head

    def place(text: str) -> str:
        return text + breaker if where == "end" else text[:3] + breaker + text[3:]

    path = "/v2/models/unet2d_nuclei_broad/infer"
    with pytest.raises(ValueError):
        _request_head("POST", place(path), b"127.0.0.1:1", 0, None)
    with pytest.raises(ValueError):
        _request_head("POST", path, b"127.0.0.1:1", 0, {"X-Test": place("value")})
    with pytest.raises(ValueError):
        _request_head("POST", path, b"127.0.0.1:1", 0, {place("X-Test"): "value"})


@FUZZ
@given(path=st.text(max_size=80), value=st.text(max_size=40))
def test_upstream_request_head_is_one_request(path, value):
    """Whatever path and header value it is given, the head it writes (if any) is exactly one
    request line and its headers, each ended by CRLF, with no other CR or LF."""
    from bioengine_core.upstream import _request_head

    try:
        head = _request_head("GET", "/" + path, b"127.0.0.1:1", 0, {"X-Test": value})
    except ValueError:
        return
    lines = head.split(b"\r\n")
    assert lines[-2:] == [b"", b""] and len(lines) == 6
    for line in lines:
        assert b"\n" not in line and b"\r" not in line and b"\0" not in line
    assert lines[0].startswith(b"GET /") and lines[0].endswith(b" HTTP/1.1")
    assert lines[0].count(b" ") == 2


@pytest.mark.parametrize("value", ["٣", "1_0", "+5", "0x10", "1e3", "５"])
def test_header_length_must_be_plain_ascii_digits(value):
    """Only ASCII decimal digits are a header length (int() would accept these spellings)."""
    with pytest.raises(InvalidInputError, match="decimal number"):
        real_parse(b"{}" * 8, value)
