"""Triton `config.pbtxt` files: rendered from tensor names, dtypes and dims.

Text protobuf written by hand (it is a handful of fields), with the data types Triton names.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

TRITON_DTYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "uint16": "TYPE_UINT16",
    "uint32": "TYPE_UINT32",
    "uint64": "TYPE_UINT64",
    "int8": "TYPE_INT8",
    "int16": "TYPE_INT16",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float16": "TYPE_FP16",
    "float32": "TYPE_FP32",
    "float64": "TYPE_FP64",
}
"""numpy dtype name -> Triton config data_type."""


def _io_block(kind: str, entries: Sequence[tuple[str, str, list[int]]]) -> list[str]:
    """Render an `input [...]`/`output [...]` block."""
    lines = [f"{kind} ["]
    for i, (nm, dtype, dims) in enumerate(entries):
        lines += [
            "  {",
            f"    name: {json.dumps(nm)}",
            f"    data_type: {dtype}",
            f"    dims: [ {', '.join(str(d) for d in dims)} ]",
            "  }" + ("," if i < len(entries) - 1 else ""),
        ]
    return [*lines, "]"]


def _instance_group(gpus: Sequence[int] | None) -> list[str]:
    if gpus:
        return [
            "instance_group [",
            "  {",
            "    count: 1",
            "    kind: KIND_GPU",
            f"    gpus: [ {', '.join(str(int(g)) for g in gpus)} ]",
            "  }",
            "]",
        ]
    return ["instance_group [", "  {", "    count: 1", "    kind: KIND_CPU", "  }", "]"]


def render_config(
    name: str,
    *,
    backend: str | None = None,
    platform: str | None = None,
    max_batch_size: int,
    inputs: Sequence[tuple[str, str, list[int]]],
    outputs: Sequence[tuple[str, str, list[int]]],
    dynamic_batching: bool,
    gpus: Sequence[int] | None = None,
    ensemble_steps: Sequence[tuple[str, dict[str, str], dict[str, str]]] = (),
    parameters: dict[str, str] | None = None,
) -> str:
    """The text of a config.pbtxt (protobuf text format of Triton's ModelConfig)."""
    lines = [f"name: {json.dumps(name)}"]
    if backend:
        lines.append(f"backend: {json.dumps(backend)}")
    if platform:
        lines.append(f"platform: {json.dumps(platform)}")
    lines.append(f"max_batch_size: {max_batch_size}")
    lines += _io_block("input", inputs)
    lines += _io_block("output", outputs)
    if ensemble_steps:
        lines += ["ensemble_scheduling {", "  step ["]
        for i, (model, in_map, out_map) in enumerate(ensemble_steps):
            lines += ["    {", f"      model_name: {json.dumps(model)}", "      model_version: -1"]
            for key, value in in_map.items():
                lines.append(
                    f"      input_map {{ key: {json.dumps(key)} value: {json.dumps(value)} }}"
                )
            for key, value in out_map.items():
                lines.append(
                    f"      output_map {{ key: {json.dumps(key)} value: {json.dumps(value)} }}"
                )
            lines.append("    }" + ("," if i < len(ensemble_steps) - 1 else ""))
        lines += ["  ]", "}"]
    else:
        if dynamic_batching:
            lines += ["dynamic_batching {", "}"]
        lines += _instance_group(gpus)
    for key, value in (parameters or {}).items():
        lines.append(
            f"parameters {{ key: {json.dumps(key)} value: {{ string_value: {json.dumps(value)} }} }}"
        )
    return "\n".join(lines) + "\n"


__all__ = ["TRITON_DTYPES", "render_config"]
