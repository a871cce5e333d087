"""Is a tensor (shape and dtype name) valid for a model input? One implementation for the
gateway and for the generated Triton model.

Stdlib only and free of other BioEngine imports: the repository builder copies this file next
to each python-backend `model.py` (as `bioengine_tensorcheck.py`), which runs inside Triton's
python stub where BioEngine may not be importable. Specs are plain dicts with the keys of
`modelpkg.TensorSpec`: id, dtype, shape (-1 variable), axes, min_shape, step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class InputProblem(ValueError):
    """A tensor does not fit the model; the message names the model and the input."""


def describe_expected(spec: Mapping[str, Any]) -> str:
    """Human-readable expected shape, e.g. "shape [batch, 1, 64+k*16, any] (axes ...) dtype ..."."""
    parts = []
    for i, size in enumerate(spec["shape"]):
        mn = _at(spec.get("min_shape"), i, 1)
        st = _at(spec.get("step"), i, 0)
        if size >= 0:
            parts.append(str(size))
        elif spec["axes"][i] == "batch":
            parts.append("batch")
        elif st:
            parts.append(f"{mn}+k*{st}")
        elif mn > 1:
            parts.append(f">={mn}")
        else:
            parts.append("any")
    return f"shape [{', '.join(parts)}] (axes {','.join(spec['axes'])}) dtype {spec['dtype']}"


def check_tensor(model_id: str, spec: Mapping[str, Any], shape: Sequence[int], dtype: str) -> None:
    """Raise InputProblem unless a tensor of `shape` and `dtype` (a numpy dtype name) is valid
    for the input `spec` of `model_id`."""
    expected = describe_expected(spec)
    got = f"got shape {list(shape)} dtype {dtype}"
    prefix = f"model '{model_id}': input '{spec['id']}'"
    if dtype != spec["dtype"]:
        raise InputProblem(f"{prefix} has the wrong dtype: expected {expected}, {got}")
    if len(shape) != len(spec["shape"]):
        raise InputProblem(
            f"{prefix} has {len(shape)} dimensions, expected {len(spec['shape'])}: "
            f"expected {expected}, {got}"
        )
    for i, size in enumerate(shape):
        fixed, axis = spec["shape"][i], spec["axes"][i]
        mn = _at(spec.get("min_shape"), i, 1)
        st = _at(spec.get("step"), i, 0)
        if fixed >= 0 and size != fixed:
            raise InputProblem(
                f"{prefix} axis '{axis}' must have size {fixed}: expected {expected}, {got}"
            )
        if fixed < 0 and size < mn:
            raise InputProblem(
                f"{prefix} axis '{axis}' must have size >= {mn}: expected {expected}, {got}"
            )
        if fixed < 0 and st > 0 and (size - mn) % st:
            raise InputProblem(
                f"{prefix} axis '{axis}' must have size {mn} + k*{st}: expected {expected}, {got}"
            )


def _at(values: Sequence[int] | None, index: int, default: int) -> int:
    return values[index] if values is not None and index < len(values) else default


__all__ = ["InputProblem", "check_tensor", "describe_expected"]
