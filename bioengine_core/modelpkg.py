"""Load and validate bioimage.io model packages (format 0.4 and 0.5) and check request tensors.

`load_package` validates a package folder with bioimageio.spec (offline, with file hash checks) and
digests its description into `TensorSpec` records: tensor ids, dtypes, shapes (-1 for variable
axes) and axis ids. These records are what the Triton model repository builder
(`bioengine_core.repository`) writes into `config.pbtxt` and what `validate_inputs` checks
requests against before they reach a replica.

Dtype policy: a request must carry each input in exactly the dtype the description declares for
it (the interface dtype of the model, before its own preprocessing). That is also the dtype that
the generated Triton `config.pbtxt` declares, and Triton rejects any other. Converting e.g. a
uint8 image to the declared float32 is the client's job; BioEngine never casts silently.

Pre- and post-processing are not applied here: see `docs/processing.md` (they run inside the
Triton model, exactly once, with bioimageio.core's own implementations).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import tensorcheck
from .errors import InvalidInputError, ModelError
from .util import WEIGHT_FORMATS, find_rdf

WEIGHT_FORMAT_PREFERENCE = WEIGHT_FORMATS
"""Weight formats BioEngine can serve, most preferred first (`util.WEIGHT_FORMATS`)."""

_AXIS_LETTERS_04 = {
    "b": "batch",
    "c": "channel",
    "i": "index",
    "t": "time",
    "z": "z",
    "y": "y",
    "x": "x",
}


@dataclass
class TensorSpec:
    """One input or output tensor of a model as clients see it at the served interface."""

    id: str
    dtype: str
    """numpy dtype name the model expects/produces at its interface, e.g. "float32"."""
    shape: list[int]
    """Size per axis; -1 for variable axes (always for the batch axis)."""
    axes: list[str]
    """Axis ids, e.g. ["batch", "channel", "y", "x"]."""
    has_batch: bool
    description: str = ""
    min_shape: list[int] = field(default_factory=list)
    """Smallest valid size per axis (equal to `shape` for fixed axes, 1 when unconstrained)."""
    step: list[int] = field(default_factory=list)
    """Valid sizes are min_shape + k*step; 0 means the size is fixed (or unconstrained if -1)."""
    batch_size: int | None = None
    """The batch size the weights accept (1 for models that cannot batch), None when any."""

    @property
    def batch_index(self) -> int | None:
        """Position of the batch axis, or None."""
        return self.axes.index("batch") if self.has_batch else None


@dataclass
class ModelPackage:
    """A validated bioimage.io model package on disk and its digested interface."""

    id: str
    name: str
    description: str
    root: Path
    rdf_path: Path
    descr: Any
    """The bioimageio.spec model description (v0_4.ModelDescr or v0_5.ModelDescr)."""
    rdf: dict
    """The plain YAML content of the description file."""
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    weight_formats: list[str]
    tags: list[str]
    test_inputs: dict[str, Path]
    test_outputs: dict[str, Path]

    @property
    def format_version(self) -> str:
        """The package's bioimage.io format version as written in its description."""
        return str(self.rdf.get("format_version", self.descr.format_version))


def safe_model_name(text: str) -> str:
    """A Triton-safe model name (letters, digits, '_', '-', '.') derived from `text`."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text.strip()).strip("._")
    if not name:
        raise ModelError(f"cannot derive a model name from {text!r}")
    return name


def _format_invalid(descr: Any, rdf_path: Path) -> str:
    """A readable summary of a bioimageio.spec validation failure."""
    lines = [f"invalid bioimage.io model package {rdf_path}:"]
    summary = getattr(descr, "validation_summary", None)
    errors = getattr(summary, "errors", None) or []
    seen = set()
    for err in errors:
        # drop pydantic's union-member names ("function-after[...]", "RelativeFilePath") from paths
        parts = [str(p) for p in getattr(err, "loc", ()) if p is not None]
        loc = ".".join(p for p in parts if "[" not in p and not p[:1].isupper())
        line = f"  - {loc or '(root)'}: {getattr(err, 'msg', err)}"
        if line not in seen and len(seen) < 20:
            seen.add(line)
            lines.append(line)
    if not errors and summary is not None:
        lines.append(str(summary.format())[:2000])
    return "\n".join(lines)


def load_package(folder: Path, *, model_id: str | None = None) -> ModelPackage:
    """Validate a bioimage.io model package folder with bioimageio.spec and digest its interface."""
    import yaml  # noqa: PLC0415  (ships with bioimageio.spec)
    from bioimageio.spec import load_description  # noqa: PLC0415  (slow import)
    from bioimageio.spec.model import v0_4, v0_5  # noqa: PLC0415

    rdf_path = find_rdf(Path(folder)).resolve()
    root = rdf_path.parent
    try:
        rdf = yaml.safe_load(rdf_path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ModelError(f"cannot read {rdf_path}: {exc}") from exc
    if not isinstance(rdf, dict):
        raise ModelError(f"{rdf_path} does not contain a YAML mapping")
    if rdf.get("type") != "model":
        raise ModelError(f"{rdf_path} describes a {rdf.get('type')!r}, not a model")
    try:
        descr = load_description(rdf_path, perform_io_checks=True, format_version="discover")
    except Exception as exc:  # bioimageio.spec raises several kinds for broken files
        raise ModelError(f"invalid bioimage.io model package {rdf_path}: {exc}") from exc
    if not isinstance(descr, (v0_4.ModelDescr, v0_5.ModelDescr)):
        raise ModelError(_format_invalid(descr, rdf_path))

    if isinstance(descr, v0_5.ModelDescr):
        inputs = [_spec_v05(t, descr.inputs) for t in descr.inputs]
        outputs = [_spec_v05(t, descr.inputs) for t in descr.outputs]
        test_inputs = {str(t.id): _local(root, t.test_tensor.source) for t in descr.inputs}
        test_outputs = {str(t.id): _local(root, t.test_tensor.source) for t in descr.outputs}
    else:
        inputs = [_spec_v04(t, descr.inputs) for t in descr.inputs]
        outputs = [_spec_v04(t, descr.inputs) for t in descr.outputs]
        test_inputs = {
            str(t.name): _local(root, s)
            for t, s in zip(descr.inputs, descr.test_inputs, strict=False)
        }
        test_outputs = {
            str(t.name): _local(root, s)
            for t, s in zip(descr.outputs, descr.test_outputs, strict=False)
        }

    weight_formats = [
        wf for wf in WEIGHT_FORMAT_PREFERENCE if getattr(descr.weights, wf, None) is not None
    ]
    weight_formats += [
        wf
        for wf in type(descr.weights).model_fields
        if getattr(descr.weights, wf, None) is not None and wf not in weight_formats
    ]
    ident = model_id or (str(descr.id) if getattr(descr, "id", None) else None) or root.name
    return ModelPackage(
        id=safe_model_name(ident),
        name=str(descr.name),
        description=str(descr.description),
        root=root,
        rdf_path=rdf_path,
        descr=descr,
        rdf=rdf,
        inputs=inputs,
        outputs=outputs,
        weight_formats=weight_formats,
        tags=[str(t) for t in descr.tags],
        test_inputs=test_inputs,
        test_outputs=test_outputs,
    )


def _local(root: Path, source: Any) -> Path:
    """The on-disk path of a file source of the package."""
    text = str(getattr(source, "source", source))
    path = Path(text)
    return path if path.is_absolute() else (root / path)


def _spec_v05(t: Any, all_inputs: Any) -> TensorSpec:
    """Digest a format-0.5 tensor description."""
    from bioimageio.spec.model import v0_5  # noqa: PLC0415

    shape: list[int] = []
    mins: list[int] = []
    steps: list[int] = []
    axes: list[str] = []
    batch_size: int | None = None
    has_batch = False
    for axis in t.axes:
        axes.append(str(axis.id))
        if isinstance(axis, v0_5.BatchAxis):
            has_batch = True
            batch_size = axis.size
            shape.append(-1)
            mins.append(1)
            steps.append(0)
            continue
        if isinstance(axis, v0_5.ChannelAxis):
            size: Any = len(axis.channel_names)
        else:
            size = getattr(axis, "size", None)
        if isinstance(size, int):
            shape.append(size)
            mins.append(size)
            steps.append(0)
        elif isinstance(size, v0_5.ParameterizedSize):
            shape.append(-1)
            mins.append(int(size.min))
            steps.append(int(size.step))
        elif isinstance(size, v0_5.SizeReference):
            fixed = _resolve_reference_v05(axis, size, all_inputs)
            shape.append(fixed if fixed is not None else -1)
            mins.append(fixed if fixed is not None else 1)
            steps.append(0)
        else:  # data dependent output size or unknown
            shape.append(-1)
            mins.append(1)
            steps.append(0)
    return TensorSpec(
        id=str(t.id),
        dtype=str(t.dtype),
        shape=shape,
        axes=axes,
        has_batch=has_batch,
        description=str(t.description or ""),
        min_shape=mins,
        step=steps,
        batch_size=batch_size,
    )


def _resolve_reference_v05(axis: Any, ref: Any, all_inputs: Any) -> int | None:
    """The size of an axis defined by reference to a fixed-size input axis, else None."""
    for t in all_inputs:
        if str(t.id) != str(ref.tensor_id):
            continue
        for ref_axis in t.axes:
            if str(ref_axis.id) == str(ref.axis_id) and isinstance(
                getattr(ref_axis, "size", None), int
            ):
                try:
                    return int(ref.get_size(axis, ref_axis))
                except Exception:  # unusual unit/scale combinations: leave it variable
                    return None
    return None


def _spec_v04(t: Any, all_inputs: Any) -> TensorSpec:
    """Digest a format-0.4 tensor description."""
    from bioimageio.spec.model import v0_4  # noqa: PLC0415

    axes = [_AXIS_LETTERS_04.get(a, a) for a in str(t.axes)]
    n = len(axes)
    shape_d = t.shape
    if isinstance(shape_d, v0_4.ParameterizedInputShape):
        shape = [
            int(s) if int(st) == 0 else -1 for s, st in zip(shape_d.min, shape_d.step, strict=False)
        ]
        mins = [int(s) for s in shape_d.min]
        steps = [int(s) for s in shape_d.step]
    elif isinstance(shape_d, v0_4.ImplicitOutputShape):
        ref = next((i for i in all_inputs if str(i.name) == str(shape_d.reference_tensor)), None)
        if ref is None:
            ref_fixed: list[int | None] = [None] * n
        elif isinstance(ref.shape, v0_4.ParameterizedInputShape):
            ref_fixed = [
                int(m) if int(st) == 0 else None
                for m, st in zip(ref.shape.min, ref.shape.step, strict=False)
            ]
        else:
            ref_fixed = [int(r) for r in ref.shape]
        shape = []
        for r, sc, off in zip(ref_fixed, shape_d.scale, shape_d.offset, strict=False):
            if sc is None or sc == 0:
                shape.append(int(2 * off))
            elif r is None:
                shape.append(-1)
            else:
                shape.append(int(r * sc + 2 * off))
        mins = [s if s > 0 else 1 for s in shape]
        steps = [0] * n
    else:
        shape = [int(s) for s in shape_d]
        mins = list(shape)
        steps = [0] * n
    has_batch = "batch" in axes
    batch_size = None
    if has_batch:
        b = axes.index("batch")
        batch_size = 1 if shape[b] == 1 else None
        shape[b] = -1
        mins[b] = 1
        steps[b] = 0
    return TensorSpec(
        id=str(t.name),
        dtype=str(t.data_type),
        shape=shape,
        axes=axes,
        has_batch=has_batch,
        description=str(t.description or ""),
        min_shape=mins,
        step=steps,
        batch_size=batch_size,
    )


def check_tensor(model_id: str, spec: TensorSpec, shape: tuple[int, ...], dtype: str) -> None:
    """Raise InvalidInputError unless `shape`/`dtype` are valid for the input `spec`."""
    try:
        tensorcheck.check_tensor(model_id, dataclasses.asdict(spec), shape, dtype)
    except tensorcheck.InputProblem as exc:
        raise InvalidInputError(str(exc)) from None


def validate_inputs(pkg: ModelPackage, inputs: dict[str, np.ndarray]) -> None:
    """Raise InvalidInputError unless `inputs` has exactly the model's inputs, valid in shape/dtype.

    The dtype must equal the declared one (what the Triton config declares); see module docs.
    """
    validate_input_specs(
        pkg, {k: (tuple(np.shape(v)), np.asarray(v).dtype.name) for k, v in inputs.items()}
    )


def validate_input_specs(pkg: ModelPackage, specs: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Like `validate_inputs`, from (shape, dtype name) per input id: no data needed, so a
    request can be checked before its tensors are read or inflated."""
    inputs = specs
    expected_ids = [s.id for s in pkg.inputs]
    missing = [i for i in expected_ids if i not in inputs]
    unknown = [k for k in inputs if k not in expected_ids]
    if missing or unknown:
        detail = []
        if missing:
            detail.append(f"missing {', '.join(repr(m) for m in missing)}")
        if unknown:
            detail.append(f"unknown {', '.join(repr(u) for u in unknown)}")
        raise InvalidInputError(
            f"model '{pkg.id}': wrong input tensors ({'; '.join(detail)}); "
            f"expected {', '.join(repr(i) for i in expected_ids)}"
        )
    for spec in pkg.inputs:
        shape, dtype = inputs[spec.id]
        check_tensor(pkg.id, spec, tuple(shape), dtype)


def has_processing(pkg: ModelPackage) -> bool:
    """True when the package declares pre/post-processing beyond a no-op dtype check.

    A native Triton backend runs the bare weights, so it can serve only models without it.
    """
    descr = pkg.descr
    is_04 = str(descr.format_version).startswith("0.4")
    for tensors, specs, attr in (
        (descr.inputs, pkg.inputs, "preprocessing"),
        (descr.outputs, pkg.outputs, "postprocessing"),
    ):
        for t, spec in zip(tensors, specs, strict=False):
            if is_04 and attr == "preprocessing" and spec.dtype != "float32":
                return True  # bioimageio.core casts 0.4 inputs to float32
            for step in getattr(t, attr) or []:
                step_id = getattr(step, "id", None) or getattr(step, "name", None)
                kwargs = getattr(step, "kwargs", None)
                if step_id == "ensure_dtype" and str(getattr(kwargs, "dtype", "")) == spec.dtype:
                    continue
                return True
    return False
