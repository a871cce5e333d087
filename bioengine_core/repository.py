"""Build Triton model directories from bioimage.io model packages.

`build_triton_model(pkg, dest)` writes `dest/<name>/config.pbtxt` and `dest/<name>/1/...`.

Where pre- and post-processing run (see also docs/processing.md): exactly once, inside the Triton
model, by bioimageio.core's own implementations.

- **python backend** (the default, and the only backend of the pip-shipped Triton): the generated
  `model.py` (template `bioengine_core/templates/triton_python_model.py`) builds a
  bioimageio.core `PredictionPipeline` from the package copied into `1/package/` and runs
  preprocessing, the weights (onnxruntime, TorchScript or pytorch_state_dict through torch,
  tensorflow_saved_model_bundle or keras_hdf5 through TensorFlow, the `tensorflow` extra) and
  postprocessing for every request. Clients send raw tensors, get final outputs.
- **native backends** (`onnxruntime_onnx`, `pytorch_libtorch`, e.g. in NVIDIA's container): they
  run only the bare weights, so BioEngine uses them only for packages without pre/post-processing
  (a dtype check that is a no-op does not count). Then `dest/<name>` is a Triton *ensemble* that
  only renames tensors (tensor ids outside, graph names such as `input.1` or `INPUT__0` inside)
  and `dest/<name>__<backend>` holds the weights. `backend="auto"` falls back to the python
  backend for packages with processing; `backend="native"` refuses them with a ModelError.

Batching: a batch axis becomes Triton's implicit batch dimension (`max_batch_size`, left out of
`dims`) with dynamic batching. The python model answers each request of a batched call on its
own (per-sample statistics stay per request) and splits a request into the batch size the
weights accept (e.g. 1). Models without a batch axis get `max_batch_size: 0`.

Size: choosing the backend and weight format (with the serving environment's optional runtimes),
the python build and the native build with its ensemble are one job: a Triton model from a package.
"""

from __future__ import annotations

import json
import shutil
import site
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import ModelError
from .modelpkg import (
    ModelPackage,
    TensorSpec,
    has_processing,
    safe_model_name,
)
from .pbtxt import TRITON_DTYPES, render_config
from .util import WEIGHT_FORMATS, missing_runtimes

PYTHON_WEIGHT_FORMATS = WEIGHT_FORMATS
"""Weight formats the generated python-backend model can run (all that BioEngine serves)."""

NATIVE_BACKENDS = {"onnx": "onnxruntime", "torchscript": "pytorch"}
"""Weight format -> Triton backend (directory name) that runs it natively."""

_PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "pytorch": "pytorch_libtorch"}
_NATIVE_FILES = {"onnxruntime": "model.onnx", "pytorch": "model.pt"}
TEMPLATE = "triton_python_model.py"
CHECKER = "bioengine_tensorcheck.py"
"""`tensorcheck.py` as the generated model.py imports it (it checks request tensors)."""
SETTINGS_FILE = "bioengine_model.json"


@dataclass
class BuiltModel:
    """A model written into a Triton model repository (load it by `name`)."""

    name: str
    backend: str
    """"python", "onnxruntime" or "pytorch"."""
    weight_format: str
    path: Path
    """The model directory (dest/<name>)."""
    composing: list[str] = field(default_factory=list)
    """Other model directories the model needs (the native model behind an ensemble)."""
    max_batch_size: int = 0
    """Triton's max_batch_size: >0 means clients send the batch axis as the first dimension."""


def default_python_paths() -> list[str]:
    """site-packages of the running interpreter: where the python backend finds bioimageio.core."""
    paths = [p for p in sys.path if p.rstrip("/").endswith(("site-packages", "dist-packages"))]
    try:
        paths += [p for p in site.getsitepackages() if p not in paths]
    except AttributeError:  # some embedded interpreters lack it
        pass
    return [p for p in paths if Path(p).is_dir()]


def choose_weight_format(
    pkg: ModelPackage,
    supported: Sequence[str],
    wanted: str | None,
    *,
    python_paths: Sequence[str] | None = None,
) -> str:
    """The weight format to serve: `wanted` if given and usable, else the first preferred one;
    a format whose runtime the environment on `python_paths` lacks is refused with its extra."""
    lacking = {} if python_paths is None else missing_runtimes(pkg.weight_formats, python_paths)
    if wanted:
        if wanted not in pkg.weight_formats:
            raise ModelError(
                f"model '{pkg.id}' has no {wanted} weights (it has: {', '.join(pkg.weight_formats)})"
            )
        if wanted not in supported:
            raise ModelError(
                f"model '{pkg.id}': {wanted} weights cannot be served here "
                f"(servable: {', '.join(supported)})"
            )
        if wanted in lacking:
            raise ModelError(f"model '{pkg.id}': its {wanted} weights need {lacking[wanted]}")
        return wanted
    for wf in WEIGHT_FORMATS:
        if wf in pkg.weight_formats and wf in supported and wf not in lacking:
            return wf
    if stuck := [wf for wf in WEIGHT_FORMATS if wf in lacking and wf in supported]:
        need = lacking[stuck[0]]
        raise ModelError(f"model '{pkg.id}': its {' and '.join(stuck)} weights need {need}")
    raise ModelError(
        f"model '{pkg.id}' has no servable weights: it has {', '.join(pkg.weight_formats)}, "
        f"BioEngine serves {', '.join(supported)}"
    )


def _choose(
    pkg: ModelPackage,
    weight_format: str | None,
    backend: str,
    available: Sequence[str],
    env: Sequence[str] | None = None,
) -> tuple[str, str]:
    """(backend, weight format) for a package under the requested backend policy; `env`: the
    python backend's site-packages (None: not known, not checked)."""
    if backend not in ("auto", "native", "python"):
        raise ModelError(f"unknown backend {backend!r}: use 'auto', 'native' or 'python'")
    natives = [wf for wf, be in NATIVE_BACKENDS.items() if be in available]
    if backend in ("auto", "native"):
        processing = has_processing(pkg)
        candidates = [wf for wf in natives if wf in pkg.weight_formats]
        if weight_format:
            candidates = [wf for wf in candidates if wf == weight_format]
        if candidates and not processing:
            wf = choose_weight_format(pkg, candidates, None)
            return NATIVE_BACKENDS[wf], wf
        if backend == "native":
            if processing:
                reason = (
                    "it has bioimage.io pre/post-processing, which only the python backend "
                    "applies (use backend 'python' or 'auto')"
                )
            else:
                reason = (
                    f"no native Triton backend for its weights ({', '.join(pkg.weight_formats)}) "
                    f"among the available backends ({', '.join(available) or 'none'})"
                )
            raise ModelError(f"model '{pkg.id}' cannot use a native backend: {reason}")
    if "python" not in available:
        raise ModelError(
            f"model '{pkg.id}' needs Triton's python backend, which this site's Triton lacks "
            f"(available: {', '.join(available) or 'none'})"
        )
    return "python", choose_weight_format(
        pkg, PYTHON_WEIGHT_FORMATS, weight_format, python_paths=env
    )


def build_triton_model(
    pkg: ModelPackage,
    dest: Path,
    *,
    weight_format: str | None = None,
    backend: str = "auto",
    available_backends: Sequence[str] = ("python",),
    max_batch_size: int = 8,
    python_paths: Sequence[str] | None = None,
    name: str | None = None,
    gpus: Sequence[int] | None = None,
    execution_env: str | None = None,
    shared_runner: bool = False,
) -> BuiltModel:
    """Write the Triton model directory (or ensemble) for `pkg` into repository `dest`.

    backend: "auto" (native when available and the model has no processing, else python),
    "native" or "python". `name` overrides the model name (default: the package id); `gpus`
    places instances on these GPU indices instead of one CPU instance. `execution_env` (python
    backend only) is a conda-pack archive/directory Triton activates for the stub
    (EXECUTION_ENV_PATH), for Triton containers whose own Python lacks bioimageio.core.
    `shared_runner`: a python-backend model runs in the replica's `bioengine_runner` process.
    """
    paths = default_python_paths() if python_paths is None else python_paths
    env = None if execution_env else paths  # an execution_env's packages are not known here
    chosen, wf = _choose(pkg, weight_format, backend, list(available_backends), env)
    model_name = safe_model_name(name or pkg.id)
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if chosen == "python":
        built = _build_python(
            pkg, dest, model_name, wf, max_batch_size, python_paths, gpus, execution_env
        )
        if shared_runner:
            settings_file = built.path / "1" / SETTINGS_FILE
            settings = json.loads(settings_file.read_text())
            settings_file.write_text(json.dumps({**settings, "shared_runner": True}, indent=2))
        return built
    return _build_native(pkg, dest, model_name, chosen, wf, max_batch_size, gpus)


def _batching(specs: Sequence[TensorSpec]) -> bool:
    """True when every tensor has a leading batch axis (Triton's implicit batch dimension)."""
    return bool(specs) and all(s.has_batch and s.batch_index == 0 for s in specs)


def _dims(spec: TensorSpec, batched: bool) -> list[int]:
    """Triton dims of a tensor: the batch axis dropped when Triton handles batching."""
    return list(spec.shape[1:] if batched else spec.shape)


def _dtype(pkg: ModelPackage, spec: TensorSpec) -> str:
    try:
        return TRITON_DTYPES[spec.dtype]
    except KeyError:
        raise ModelError(
            f"model '{pkg.id}': tensor '{spec.id}' has dtype {spec.dtype}, which Triton cannot carry"
        ) from None


def _fresh_dir(path: Path) -> Path:
    """An empty directory at `path` (an earlier build of the same model is replaced)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _spec_json(spec: TensorSpec) -> dict:
    return {
        "id": spec.id,
        "dtype": spec.dtype,
        "shape": spec.shape,
        "axes": spec.axes,
        "has_batch": spec.has_batch,
        "min_shape": spec.min_shape or [1 if s < 0 else s for s in spec.shape],
        "step": spec.step or [0] * len(spec.shape),
        "batch_size": spec.batch_size,
    }


def _build_python(
    pkg: ModelPackage,
    dest: Path,
    name: str,
    weight_format: str,
    max_batch_size: int,
    python_paths: Sequence[str] | None,
    gpus: Sequence[int] | None,
    execution_env: str | None = None,
) -> BuiltModel:
    """Python-backend model: model.py + settings + the whole package under 1/package/."""
    batched = _batching([*pkg.inputs, *pkg.outputs]) and max_batch_size > 0
    model_dir = _fresh_dir(dest / name)
    version = model_dir / "1"
    shutil.copytree(pkg.root, version / "package")
    template = resources.files("bioengine_core") / "templates" / TEMPLATE
    (version / "model.py").write_text(template.read_text(encoding="utf-8"), encoding="utf-8")
    checker = resources.files("bioengine_core") / "tensorcheck.py"
    (version / CHECKER).write_text(checker.read_text(encoding="utf-8"), encoding="utf-8")
    wire = resources.files("bioengine_core") / "templates" / "bioengine_wire.py"
    (version / "bioengine_wire.py").write_text(wire.read_text(encoding="utf-8"), encoding="utf-8")
    settings = {
        "model_id": pkg.id,
        "triton_name": name,
        "weight_format": weight_format,
        "rdf": f"package/{pkg.rdf_path.relative_to(pkg.root).as_posix()}",
        "python_paths": list(default_python_paths() if python_paths is None else python_paths),
        "inputs": [_spec_json(s) for s in pkg.inputs],
        "outputs": [_spec_json(s) for s in pkg.outputs],
    }
    (version / SETTINGS_FILE).write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")
    text = render_config(
        name,
        backend="python",
        max_batch_size=max_batch_size if batched else 0,
        inputs=[(s.id, _dtype(pkg, s), _dims(s, batched)) for s in pkg.inputs],
        outputs=[(s.id, _dtype(pkg, s), _dims(s, batched)) for s in pkg.outputs],
        dynamic_batching=batched,
        gpus=gpus,
        parameters={"EXECUTION_ENV_PATH": execution_env} if execution_env else None,
    )
    (model_dir / "config.pbtxt").write_text(text, encoding="utf-8")
    return BuiltModel(
        name=name,
        backend="python",
        weight_format=weight_format,
        path=model_dir,
        max_batch_size=max_batch_size if batched else 0,
    )


def _onnx_io(path: Path) -> tuple[list[str], list[str], list[object]]:
    """Graph input names, output names and the first input's leading dim of an ONNX file."""
    try:
        import onnxruntime as ort  # noqa: PLC0415  (optional: the `onnx` extra)
    except ImportError as exc:
        raise ModelError(
            "building a native onnxruntime model needs onnxruntime to read the graph's tensor "
            "names: pip install 'bioengine[onnx]'"
        ) from exc
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    leading = [(i.shape or [None])[0] for i in sess.get_inputs()]
    return [i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()], leading


@dataclass
class _NativeIO:
    """How the weights name their tensors and whether they take a batch of any size."""

    inputs: list[str]
    outputs: list[str]
    graph_batches: bool
    fixed_batch: int | None


def _native_io(pkg: ModelPackage, backend: str, weight_format: str, source: Path) -> _NativeIO:
    """Tensor names and batch behaviour of native weights, checked against the description."""
    if backend == "onnxruntime":
        in_names, out_names, leading = _onnx_io(source)
        graph_batches = all(isinstance(d, str) or d is None or d == -1 for d in leading)
    else:
        in_names = [f"INPUT__{i}" for i in range(len(pkg.inputs))]
        out_names = [f"OUTPUT__{i}" for i in range(len(pkg.outputs))]
        leading = []
        graph_batches = all(s.batch_size is None for s in pkg.inputs)
    if len(in_names) != len(pkg.inputs) or len(out_names) != len(pkg.outputs):
        raise ModelError(
            f"model '{pkg.id}': the {weight_format} weights have {len(in_names)} inputs and "
            f"{len(out_names)} outputs, the description {len(pkg.inputs)} and {len(pkg.outputs)}"
        )
    fixed_batch = min((s.batch_size for s in pkg.inputs if s.batch_size), default=None)
    if backend == "onnxruntime" and not graph_batches:
        fixed_batch = next((d for d in leading if isinstance(d, int) and d > 0), fixed_batch)
    return _NativeIO(in_names, out_names, graph_batches, fixed_batch)


def _build_native(
    pkg: ModelPackage,
    dest: Path,
    name: str,
    backend: str,
    weight_format: str,
    max_batch_size: int,
    gpus: Sequence[int] | None,
) -> BuiltModel:
    """Native model `<name>__<backend>` with the weights, behind an ensemble `<name>` that renames."""
    source = pkg.root / str(getattr(pkg.descr.weights, weight_format).source)
    io = _native_io(pkg, backend, weight_format, source)
    batched = _batching([*pkg.inputs, *pkg.outputs]) and max_batch_size > 0 and io.graph_batches
    mbs = max_batch_size if batched else 0

    def dims(spec: TensorSpec) -> list[int]:
        d = _dims(spec, batched)
        if not batched and spec.has_batch and io.fixed_batch:
            d[spec.batch_index] = io.fixed_batch  # weights with a fixed batch size
        return d

    inner = f"{name}__{backend}"
    inner_dir = _fresh_dir(dest / inner)
    (inner_dir / "1").mkdir()
    shutil.copy2(source, inner_dir / "1" / _NATIVE_FILES[backend])
    inner_text = render_config(
        inner,
        platform=_PLATFORMS[backend],
        max_batch_size=mbs,
        inputs=[(n, _dtype(pkg, s), dims(s)) for n, s in zip(io.inputs, pkg.inputs, strict=False)],
        outputs=[
            (n, _dtype(pkg, s), dims(s)) for n, s in zip(io.outputs, pkg.outputs, strict=False)
        ],
        dynamic_batching=batched,
        gpus=gpus,
    )
    (inner_dir / "config.pbtxt").write_text(inner_text, encoding="utf-8")
    outer_dir = _write_ensemble(pkg, dest, name, inner, io, mbs, dims)
    return BuiltModel(
        name=name,
        backend=backend,
        weight_format=weight_format,
        path=outer_dir,
        composing=[inner],
        max_batch_size=mbs,
    )


def _write_ensemble(
    pkg: ModelPackage,
    dest: Path,
    name: str,
    inner: str,
    io: _NativeIO,
    mbs: int,
    dims: Callable[[TensorSpec], list[int]],
) -> Path:
    """The ensemble `<name>` that maps the description's tensor ids to the weights' names."""
    outer_dir = _fresh_dir(dest / name)
    (outer_dir / "1").mkdir()  # Triton wants a version directory for ensembles too
    outer_text = render_config(
        name,
        platform="ensemble",
        max_batch_size=mbs,
        inputs=[(s.id, _dtype(pkg, s), dims(s)) for s in pkg.inputs],
        outputs=[(s.id, _dtype(pkg, s), dims(s)) for s in pkg.outputs],
        dynamic_batching=False,
        ensemble_steps=[
            (
                inner,
                {n: s.id for n, s in zip(io.inputs, pkg.inputs, strict=False)},
                {n: s.id for n, s in zip(io.outputs, pkg.outputs, strict=False)},
            )
        ],
    )
    (outer_dir / "config.pbtxt").write_text(outer_text, encoding="utf-8")
    return outer_dir
