"""KServe v2 inference requests: parsed from untrusted bytes, validated, and rebuilt for a replica.

A client's body never reaches a replica as it came: the JSON header is parsed (bounded in size
and depth), every field is checked against the model (input names, shapes, dtypes, requested
outputs, parameters), JSON tensor data is converted to binary, and a new header is written with
a request id of the gateway's own. The replica's answer must carry that id back, which pairs
every response with its request; the client's own id is then restored.
"""

from __future__ import annotations

import json
import math
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tritonclient.utils import triton_to_np_dtype

from .errors import InvalidInputError

HEADER_LEN = "Inference-Header-Content-Length"
MAX_HEADER_BYTES = 1 << 20
"""Largest JSON header accepted with binary tensors (names and shapes need a few hundred bytes)."""
MAX_JSON_BODY_BYTES = 64 << 20
"""Largest all-JSON request (tensor data as JSON text): parsing JSON costs ~10x its size."""
MAX_TENSORS = 64
MAX_DIMS = 16
MAX_ID_CHARS = 256
_NUMERIC = {
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
}
_ID_RE = re.compile(r"^[\x20-\x7e]*$")


class ProtocolError(ConnectionError):
    """A replica's answer does not belong to the request it was sent for (or is malformed)."""


@dataclass
class Tensor:
    """One validated input: name, shape, Triton datatype and its bytes (a view, not a copy)."""

    name: str
    shape: list[int]
    datatype: str
    data: memoryview


@dataclass
class InferRequest:
    """A validated inference request, ready to be rebuilt for a replica."""

    model: str
    inputs: list[Tensor]
    outputs: list[tuple[str, bool]] | None
    """Requested outputs as (name, binary); None for all outputs."""
    binary_output: bool = False
    client_id: str | None = None
    timeout: float | None = None
    """The caller's deadline in seconds (KServe `parameters.timeout`, microseconds on the wire)."""
    nonce: str = field(default_factory=lambda: "be-" + secrets.token_hex(8))
    weights_only: bool = False
    """Ask the generated model to run the weights only (a tile already preprocessed)."""

    def build(self) -> tuple[list[bytes | memoryview], dict[str, str]]:
        """The body (as buffers) and headers to send to a replica: only validated parts."""
        header: dict[str, Any] = {
            "id": self.nonce,
            "inputs": [
                {
                    "name": t.name,
                    "shape": t.shape,
                    "datatype": t.datatype,
                    "parameters": {"binary_data_size": len(t.data)},
                }
                for t in self.inputs
            ],
        }
        if self.outputs is not None:
            header["outputs"] = [
                {"name": name, "parameters": {"binary_data": binary}}
                for name, binary in self.outputs
            ]
        elif self.binary_output:
            header["parameters"] = {"binary_data_output": True}
        if self.weights_only:
            header.setdefault("parameters", {})["bioengine_weights_only"] = True
        head = json.dumps(header, separators=(",", ":")).encode()
        return [head, *(t.data for t in self.inputs)], {
            "Content-Type": "application/octet-stream",
            HEADER_LEN: str(len(head)),
        }


def _bad(model: str, what: str) -> InvalidInputError:
    return InvalidInputError(f"malformed inference request for model '{model}': {what}")


def _loads(model: str, data: bytes | memoryview, what: str) -> Any:
    try:
        return json.loads(bytes(data))
    except RecursionError:
        raise _bad(model, f"{what} is nested too deeply") from None
    except UnicodeDecodeError:
        raise _bad(model, f"{what} is not UTF-8") from None
    except ValueError as exc:
        raise _bad(model, f"{what} is not valid JSON ({exc})") from None


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shape(model: str, name: str, shape: Any) -> list[int]:
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_DIMS
        or not all(_int(d) and 0 <= d < 1 << 40 for d in shape)
    ):
        raise InvalidInputError(
            f"model '{model}' input '{name}': shape must be a list of at most {MAX_DIMS} "
            f"non-negative sizes, got {str(shape)[:80]}"
        )
    return shape


def _json_tensor(model: str, name: str, data: Any, shape: list[int], dtype: np.dtype) -> bytes:
    """JSON tensor data (flat or nested numbers) as the bytes of a C-ordered array.

    Elements are checked as the Python values JSON gave (exact integers, no silent rounding or
    wrap-around), then converted.
    """
    count = math.prod(shape)
    prefix = f"model '{model}' input '{name}': bad 'data'"
    if not isinstance(data, list):
        raise InvalidInputError(f"model '{model}' input '{name}': 'data' must be a list")
    try:
        arr = np.array(data, dtype=object)
    except (ValueError, TypeError):
        raise InvalidInputError(f"{prefix}: nested lists of unequal length") from None
    if arr.size != count:
        raise InvalidInputError(f"{prefix}: {arr.size} values for shape {shape} ({count} expected)")
    flat = arr.ravel()
    if dtype.kind == "b":
        ok = all(isinstance(v, bool) for v in flat)
        expected = "true/false"
    elif dtype.kind in "iu":
        ok = all(isinstance(v, int) and not isinstance(v, bool) for v in flat)
        expected = f"integer numbers ({dtype.name})"
        if ok and count:
            info = np.iinfo(dtype)
            if min(flat) < info.min or max(flat) > info.max:
                raise InvalidInputError(f"{prefix}: values out of range for {dtype.name}")
    else:
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in flat)
        expected = f"numbers ({dtype.name})"
    if not ok:
        raise InvalidInputError(f"{prefix}: elements must be {expected}")
    try:
        with np.errstate(over="ignore"):
            cast = np.array(flat.tolist(), dtype=dtype) if count else np.zeros(0, dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidInputError(f"{prefix}: {exc}") from None
    return np.ascontiguousarray(cast.reshape(shape)).tobytes()


def parse_request(
    model: str,
    body: bytes | bytearray | memoryview,
    header_length: str | None,
    *,
    package: Any,
    check: Any,
) -> InferRequest:
    """Parse and validate a KServe v2 infer body for `model`.

    `check(specs)` validates `{input: (shape, dtype name)}` against the model before any tensor
    data is converted; `package` gives the output names. InvalidInputError on anything wrong.
    """
    view = memoryview(body)
    if header_length is not None:
        raw = header_length.strip()
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 12):
            raise _bad(model, f"{HEADER_LEN} must be a decimal number of bytes")
        hl = int(raw)
        if not 0 < hl <= len(view):
            raise _bad(model, f"{HEADER_LEN} {hl} is outside the body (of {len(view)} bytes)")
        if hl > MAX_HEADER_BYTES:
            raise _bad(model, f"the JSON header is larger than {MAX_HEADER_BYTES} bytes")
    else:
        hl = len(view)
        if hl > MAX_JSON_BODY_BYTES:
            raise InvalidInputError(
                f"model '{model}': an all-JSON request may have at most {MAX_JSON_BODY_BYTES} "
                "bytes; send tensors as binary data (tritonclient: binary_data=True)"
            )
    header = _loads(model, view[:hl], "the JSON header")
    if not isinstance(header, dict):
        raise _bad(model, "the JSON header must be an object")
    unknown = set(header) - {"id", "inputs", "outputs", "parameters"}
    if unknown:
        raise _bad(model, f"unknown field(s) {', '.join(sorted(map(repr, unknown)))}")
    client_id = header.get("id")
    if client_id is not None and (
        not isinstance(client_id, str)
        or len(client_id) > MAX_ID_CHARS
        or not _ID_RE.fullmatch(client_id)
    ):
        raise _bad(model, f"'id' must be printable ASCII text of at most {MAX_ID_CHARS} characters")
    params = header.get("parameters") or {}
    if not isinstance(params, dict):
        raise _bad(model, "'parameters' must be an object")
    timeout = None
    binary_output = False
    for key, value in params.items():
        if key == "timeout":
            if not _int(value) or value < 0:
                raise _bad(model, "parameters.timeout must be a non-negative integer (µs)")
            timeout = value / 1e6 if value else None
        elif key == "binary_data_output":
            if not isinstance(value, bool):
                raise _bad(model, "parameters.binary_data_output must be true or false")
            binary_output = value
        elif key == "priority":
            if not _int(value) or value < 0:
                raise _bad(model, "parameters.priority must be a non-negative integer")
        else:
            raise _bad(model, f"unsupported parameter {str(key)[:40]!r}")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs or len(inputs) > MAX_TENSORS:
        raise _bad(model, f"'inputs' must be a list of 1 to {MAX_TENSORS} tensors")
    declared: list[tuple[str, list[int], str, np.dtype, dict[str, Any]]] = []
    names: set[str] = set()
    for item in inputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _bad(model, "each input must be an object with a 'name'")
        name = item["name"]
        if name in names:
            raise _bad(model, f"input {name[:60]!r} is given twice")
        names.add(name)
        extra = set(item) - {"name", "shape", "datatype", "parameters", "data"}
        if extra:
            raise _bad(model, f"input {name[:60]!r}: unknown field(s) {sorted(extra)}")
        shape = _shape(model, name[:60], item.get("shape"))
        datatype = item.get("datatype")
        if not isinstance(datatype, str) or datatype not in _NUMERIC:
            raise InvalidInputError(
                f"model '{model}' input {name[:60]!r}: unsupported datatype {str(datatype)[:20]!r}"
            )
        iparams = item.get("parameters") or {}
        if not isinstance(iparams, dict) or set(iparams) - {"binary_data_size"}:
            raise _bad(model, f"input {name[:60]!r}: only parameters.binary_data_size is supported")
        declared.append((name, shape, datatype, np.dtype(triton_to_np_dtype(datatype)), item))
    check({name: (tuple(shape), dtype.name) for name, shape, _, dtype, _ in declared})
    tensors: list[Tensor] = []
    offset = hl
    for name, shape, datatype, dtype, item in declared:
        nbytes = math.prod(shape) * dtype.itemsize
        size = (item.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if "data" in item:
                raise _bad(model, f"input {name!r} has both binary data and JSON 'data'")
            if not _int(size) or size != nbytes:
                raise InvalidInputError(
                    f"model '{model}' input '{name}': binary_data_size {size} does not match "
                    f"shape {shape} {dtype.name} ({nbytes} bytes)"
                )
            if offset + nbytes > len(view):
                raise InvalidInputError(
                    f"model '{model}' input '{name}': the body ends before its {nbytes} bytes"
                )
            data = view[offset : offset + nbytes]
            offset += nbytes
        else:
            if "data" not in item:
                raise _bad(model, f"input {name!r} has neither binary data nor 'data'")
            data = memoryview(_json_tensor(model, name, item["data"], shape, dtype))
        tensors.append(Tensor(name, shape, datatype, data))
    if offset != len(view):
        raise _bad(model, f"{len(view) - offset} bytes after the last tensor")
    outputs = None
    if "outputs" in header:
        raw = header["outputs"]
        known = [t.id for t in package.outputs]
        if not isinstance(raw, list) or len(raw) > MAX_TENSORS:
            raise _bad(model, "'outputs' must be a list")
        outputs = []
        for item in raw:
            if not isinstance(item, dict) or item.get("name") not in known:
                shown = item.get("name") if isinstance(item, dict) else item
                raise InvalidInputError(
                    f"model '{model}': unknown output {str(shown)[:60]!r} (outputs: "
                    f"{', '.join(known)})"
                )
            oparams = item.get("parameters") or {}
            if not isinstance(oparams, dict) or set(oparams) - {"binary_data"}:
                raise _bad(
                    model, f"output {item['name']!r}: only parameters.binary_data is supported"
                )
            binary = oparams.get("binary_data", binary_output)
            if not isinstance(binary, bool):
                raise _bad(model, "parameters.binary_data must be true or false")
            outputs.append((item["name"], binary))
    return InferRequest(model, tensors, outputs, binary_output, client_id, timeout)


def check_response(
    request: InferRequest, status: int, data: bytes, headers: dict[str, str]
) -> tuple[bytes, dict[str, str]]:
    """Verify a replica's 200 answer belongs to `request`; return it with the client's id.

    Raises ProtocolError (the connection is not to be trusted) when the id, the model name or
    the binary sizes do not match.
    """
    raw_len = headers.get(HEADER_LEN.lower(), headers.get(HEADER_LEN))
    try:
        hl = int(raw_len) if raw_len is not None else len(data)
        if not 0 < hl <= len(data):
            raise ProtocolError("replica's answer header length is outside its body")
        header = json.loads(data[:hl])
        if not isinstance(header, dict) or header.get("id") != request.nonce:
            got = header.get("id") if isinstance(header, dict) else None
            raise ProtocolError(
                f"replica answered request {str(got)[:40]!r} to request {request.nonce!r}"
            )
        if header.get("model_name") != request.model:
            raise ProtocolError("replica answered for another model")
        outputs = header.get("outputs", [])
        if not isinstance(outputs, list):
            raise ProtocolError("replica's answer has no list of outputs")
        sizes = 0
        for out in outputs:
            params = out.get("parameters") or {}
            size = params.get("binary_data_size", 0) if isinstance(params, dict) else None
            if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ProtocolError("replica's answer has a bad binary_data_size")
            sizes += size
    except ProtocolError:
        raise
    except (ValueError, TypeError, AttributeError, RecursionError):
        raise ProtocolError("replica's answer is not a valid KServe v2 response") from None
    if hl + sizes != len(data):
        raise ProtocolError("replica's answer size does not match its header")
    if request.client_id is not None:
        header["id"] = request.client_id
    else:
        header.pop("id", None)
    head = json.dumps(header, separators=(",", ":")).encode()
    out_headers = {"Content-Type": "application/octet-stream" if sizes else "application/json"}
    if sizes:
        out_headers[HEADER_LEN] = str(len(head))
    return head + data[hl:], out_headers


__all__ = [
    "HEADER_LEN",
    "InferRequest",
    "ProtocolError",
    "Tensor",
    "check_response",
    "parse_request",
]
