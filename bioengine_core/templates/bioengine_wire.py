"""The wire between a thin python-backend stub and the shared runner (`bioengine_runner`): a
length-prefixed JSON header followed by the raw bytes of each array, over a Unix socket in a
directory only this user can open. Copied next to each generated model.py."""

import json
import os
import struct
import tempfile

import numpy as np

_LEN = struct.Struct("!I")
MAX_HEADER = 1 << 20
DTYPES = {
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
}  # fmt: skip


class WireError(Exception):
    """The other end sent something this protocol does not allow."""


def runner_socket(triton_pid):
    """The runner socket of the Triton process `triton_pid` (a private per-user directory)."""
    folder = os.path.join(tempfile.gettempdir(), f"bioengine-runner-{os.getuid()}")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    if os.stat(folder).st_uid != os.getuid():
        raise WireError(f"{folder} belongs to another user")
    return os.path.join(folder, f"{int(triton_pid)}.sock")


def _recv_exact(sock, n):
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise EOFError("connection closed")
        got += k
    return buf


def send_msg(sock, header, arrays=None):
    """Send `header` (a dict) and `arrays` ({name: ndarray})."""
    arrays = {k: np.ascontiguousarray(v) for k, v in (arrays or {}).items()}
    header = dict(header)
    header["arrays"] = [
        {"id": k, "dtype": a.dtype.name, "shape": list(a.shape)} for k, a in arrays.items()
    ]
    data = json.dumps(header, separators=(",", ":")).encode()
    parts = [memoryview(_LEN.pack(len(data)) + data)]
    parts += [memoryview(a).cast("B") for a in arrays.values() if a.nbytes]
    while parts:  # one scatter-gather write per message in the common case
        sent = sock.sendmsg(parts)
        while parts and sent >= len(parts[0]):
            sent -= len(parts[0])
            parts.pop(0)
        if parts and sent:
            parts[0] = parts[0][sent:]


def recv_msg(sock):
    """Receive one message: (header, {name: ndarray}); WireError for a malformed one."""
    (size,) = _LEN.unpack(bytes(_recv_exact(sock, _LEN.size)))
    if size > MAX_HEADER:
        raise WireError(f"header of {size} bytes")
    header = json.loads(bytes(_recv_exact(sock, size)))
    arrays = {}
    for spec in header.get("arrays", []):
        if spec["dtype"] not in DTYPES:
            raise WireError(f"dtype {spec['dtype']!r}")
        shape = tuple(int(d) for d in spec["shape"])
        arr = np.empty(shape, dtype=spec["dtype"])
        if arr.nbytes:
            arr = np.frombuffer(_recv_exact(sock, arr.nbytes), dtype=arr.dtype).reshape(shape)
        arrays[str(spec["id"])] = arr
    return header, arrays
