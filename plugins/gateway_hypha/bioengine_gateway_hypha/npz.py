"""Reading an untrusted .npz request body: sizes, names and .npy headers are checked first.

`inspect_npz` looks only at the zip's directory and at each member's .npy header (a few
hundred bytes): member count, names, compression method and ratio, declared sizes, shape and
dtype. Nothing is inflated or allocated for array data until `read_arrays`, which runs after
the caller has checked those shapes against the model. No pickles: object dtypes are refused.
"""

from __future__ import annotations

import io
import math
import re
import struct
import zipfile
from dataclasses import dataclass

import numpy as np
from numpy.lib import format as npy_format

MAX_MEMBERS = 64
"""Most arrays one request may carry."""

MAX_RATIO = 100.0
"""Highest declared uncompressed/compressed size ratio of a deflated member (zip bombs)."""

MAX_HEADER = 10_000
"""Longest .npy header accepted (numpy's own default limit)."""

MAX_NDIM = 32
"""Most dimensions an array may declare (numpy's own limit)."""

ALLOWED_KINDS = "biuf"
"""Accepted dtype kinds: bool, signed and unsigned integers, floats."""

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_CD_ENTRY_MAX = 46 + 132 + 1024  # fixed part + longest name + extra fields/comment allowance
_EOCD = struct.Struct("<4s4H2LH")
_EOCD64_LOCATOR = struct.Struct("<4sLQL")
_EOCD64 = struct.Struct("<4sQ2H2L4Q")


class NpzRefused(Exception):
    """The body is not an acceptable .npz; `status` is the HTTP status to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Member:
    """One array of the archive as its header declares it (no data read)."""

    name: str
    info: zipfile.ZipInfo
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    header_size: int

    @property
    def nbytes(self) -> int:
        """Bytes of array data the header declares."""
        return math.prod(self.shape) * self.dtype.itemsize


def _directory_bounds(data: memoryview) -> tuple[int, int]:
    """(entries, central directory size) as zipfile will read them from the end records."""
    size = len(data)
    if size < _EOCD.size:
        raise NpzRefused("body is not a .npz (zip) archive: too short")
    tail = bytes(data[size - _EOCD.size :])
    if tail[:4] == b"PK\x05\x06" and tail[-2:] == b"\0\0":
        pos = size - _EOCD.size
    else:
        start = max(0, size - _EOCD.size - 0xFFFF)
        found = bytes(data[start:]).rfind(b"PK\x05\x06")
        if found < 0 or start + found + _EOCD.size > size:
            raise NpzRefused("body is not a .npz (zip) archive: no end of central directory")
        pos = start + found
    _, disk, disk_cd, _, entries, cd_size, _, _ = _EOCD.unpack_from(data, pos)
    if disk or disk_cd:
        raise NpzRefused("multi-disk zip archives are not accepted")
    locator = pos - _EOCD64_LOCATOR.size
    if locator >= 0 and bytes(data[locator : locator + 4]) == b"PK\x06\x07":
        _, disk, _, disks = _EOCD64_LOCATOR.unpack_from(data, locator)
        if disk or disks > 1:
            raise NpzRefused("multi-disk zip archives are not accepted")
        record = locator - _EOCD64.size
        if record >= 0 and bytes(data[record : record + 4]) == b"PK\x06\x06":
            fields = _EOCD64.unpack_from(data, record)
            entries, cd_size = fields[7], fields[8]
    return entries, cd_size


def _check_info(info: zipfile.ZipInfo, seen: set[str]) -> str:
    """The tensor name of a member, or NpzRefused saying what is wrong with it."""
    filename = info.filename
    stem = filename[:-4] if filename.endswith(".npy") else ""
    if not stem or not _NAME.fullmatch(stem) or ".." in stem:
        raise NpzRefused(
            f"member {filename[:80]!r}: names must be NAME.npy with NAME of letters, digits, "
            "'_', '-' and '.' (no paths), at most 128 characters"
        )
    if stem in seen:
        raise NpzRefused(f"member {filename!r} appears twice")
    seen.add(stem)
    if info.flag_bits & 0x1:
        raise NpzRefused(f"member {filename!r} is encrypted")
    if info.compress_type == zipfile.ZIP_STORED:
        if info.file_size != info.compress_size:
            raise NpzRefused(f"member {filename!r}: stored sizes disagree")
    elif info.compress_type == zipfile.ZIP_DEFLATED:
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > MAX_RATIO:
            raise NpzRefused(
                f"member {filename!r} would inflate {ratio:.0f}x "
                f"({info.compress_size} -> {info.file_size} bytes); at most {MAX_RATIO:.0f}x "
                "is accepted"
            )
    else:
        raise NpzRefused(
            f"member {filename!r}: compression method {info.compress_type} is not accepted "
            "(only stored or deflated)",
            status=415,
        )
    return stem


def _read_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str) -> Member:
    """Parse one member's .npy header (reads at most MAX_HEADER bytes of it)."""
    with zf.open(info) as fp:
        try:
            version = npy_format.read_magic(fp)
            if version == (1, 0):
                shape, fortran, dtype = npy_format.read_array_header_1_0(
                    fp, max_header_size=MAX_HEADER
                )
            elif version == (2, 0):
                shape, fortran, dtype = npy_format.read_array_header_2_0(
                    fp, max_header_size=MAX_HEADER
                )
            else:
                raise NpzRefused(f"member {info.filename!r}: .npy format {version} not accepted")
        except NpzRefused:
            raise
        except zipfile.BadZipFile as exc:
            raise NpzRefused(f"member {info.filename!r} is corrupt: {exc}") from None
        except (ValueError, EOFError, OSError, SyntaxError) as exc:
            raise NpzRefused(f"member {info.filename!r} is not a valid .npy: {exc}") from None
        header_size = fp.tell()
    if dtype.hasobject:
        raise NpzRefused(f"member {info.filename!r}: object (pickled) arrays are not accepted")
    if dtype.kind not in ALLOWED_KINDS or dtype.shape:
        raise NpzRefused(
            f"member {info.filename!r}: dtype {dtype.str} is not accepted "
            "(bool, integer or float arrays only)"
        )
    if len(shape) > MAX_NDIM or any(d < 0 for d in shape):
        raise NpzRefused(f"member {info.filename!r}: invalid shape {shape}")
    member = Member(name, info, tuple(int(d) for d in shape), dtype, bool(fortran), header_size)
    if header_size + member.nbytes != info.file_size:
        raise NpzRefused(
            f"member {info.filename!r} declares shape {list(shape)} {dtype.name} "
            f"({member.nbytes} bytes of data) but holds {info.file_size - header_size} bytes"
        )
    return member


def inspect_npz(
    body: io.BytesIO, *, max_bytes: int, max_members: int = MAX_MEMBERS
) -> tuple[zipfile.ZipFile, list[Member]]:
    """Open `body` and check every member's name, sizes and header; no array data is read."""
    with body.getbuffer() as view:
        entries, cd_size = _directory_bounds(view)
    if entries > max_members or cd_size > max_members * _CD_ENTRY_MAX:
        raise NpzRefused(f"too many arrays: at most {max_members} per request")
    if entries == 0:
        raise NpzRefused("the .npz archive holds no arrays")
    try:
        zf = zipfile.ZipFile(body)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError) as exc:
        raise NpzRefused(f"body is not a valid .npz (zip) archive: {exc}") from None
    try:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise NpzRefused(f"too many arrays: at most {max_members} per request")
        seen: set[str] = set()
        names = [_check_info(info, seen) for info in infos]
        total = sum(info.file_size for info in infos)
        if total > max_bytes:
            raise NpzRefused(
                f"the arrays would take {total} bytes; at most {max_bytes} are accepted", 413
            )
        members = [_read_header(zf, info, name) for info, name in zip(infos, names, strict=True)]
    except BaseException:
        zf.close()
        raise
    return zf, members


def read_arrays(zf: zipfile.ZipFile, members: list[Member]) -> dict[str, np.ndarray]:
    """Read the (already checked) arrays; NpzRefused if the data is not what was declared."""
    arrays: dict[str, np.ndarray] = {}
    for member in members:
        try:
            with zf.open(member.info) as fp:
                fp.read(member.header_size)
                data = fp.read(member.nbytes)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise NpzRefused(f"member {member.info.filename!r} is corrupt: {exc}") from None
        if len(data) != member.nbytes:
            raise NpzRefused(f"member {member.info.filename!r} is truncated")
        array = np.frombuffer(data, dtype=member.dtype)
        if not member.dtype.isnative:
            array = array.astype(member.dtype.newbyteorder("="))
        order = "F" if member.fortran_order else "C"
        arrays[member.name] = array.reshape(member.shape, order=order)
    return arrays
