"""Model repository builder: golden config.pbtxt files, backend choice, and real Triton serving.

The serving tests start the real `tritonserver` (pip-shipped, python backend only) once for the
module on free ports, load models built from the model-zoo package unet2d_nuclei_broad (ONNX and
TorchScript weights) and from a tiny format-0.4 package written here with torch, and check that
tritonclient gets the package's reference outputs (so pre/post-processing ran exactly once).
Set UPDATE_GOLDEN=1 to rewrite the golden files after an intended change.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import yaml

from bioengine_core.errors import ExecutorError, ModelError
from bioengine_core.modelpkg import load_package
from bioengine_core.repository import build_triton_model
from bioengine_core.testing.pytest_plugin import require_service
from bioengine_core.triton import find_triton, triton_args, wait_ready

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

ROOT = Path(__file__).resolve().parents[1]
UNET = ROOT / "models" / "unet2d_nuclei_broad"
GOLDEN = Path(__file__).parent / "golden" / "repository"

TINY_ARCH = """import torch


class TinyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, x):
        return self.conv(x)
"""
TINY_GAIN, TINY_OFFSET = 0.02, -2.0


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make_tiny_v04(folder: Path) -> Path:
    """Write a format-0.4 package: uint8 input, scale_linear preprocessing, sigmoid postprocessing.

    Its test output is computed here with plain torch (not bioimageio.core), so serving it checks
    that each processing step runs exactly once.
    """
    torch = pytest.importorskip("torch")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny_arch.py").write_text(TINY_ARCH)
    namespace: dict = {}
    exec(TINY_ARCH, namespace)
    torch.manual_seed(0)
    net = namespace["TinyNet"]().eval()
    torch.save(net.state_dict(), folder / "weights_state.pt")
    torch.jit.trace(net, torch.zeros(1, 1, 16, 16)).save(str(folder / "weights_ts.pt"))
    x = np.random.default_rng(0).integers(0, 255, size=(1, 1, 32, 32), dtype=np.uint8)
    np.save(folder / "test_input.npy", x)
    np.save(folder / "test_output.npy", tiny_expected(folder, x))
    (folder / "README.md").write_text("# tiny\nA 3x3 convolution for BioEngine's tests.\n")
    rdf = {
        "format_version": "0.4.10",
        "type": "model",
        "name": "tiny conv 0.4",
        "description": "a 3x3 convolution for tests",
        "authors": [{"name": "BioEngine tests"}],
        "cite": [{"text": "none", "url": "https://example.com"}],
        "documentation": "README.md",
        "license": "MIT",
        "tags": ["test"],
        "timestamp": "2024-01-01T00:00:00",
        "test_inputs": ["test_input.npy"],
        "test_outputs": ["test_output.npy"],
        "inputs": [
            {
                "name": "input0",
                "axes": "bcyx",
                "data_type": "uint8",
                "data_range": [0, 255],
                "shape": {"min": [1, 1, 16, 16], "step": [0, 0, 16, 16]},
                "preprocessing": [
                    {"name": "scale_linear", "kwargs": {"gain": TINY_GAIN, "offset": TINY_OFFSET}}
                ],
            }
        ],
        "outputs": [
            {
                "name": "output0",
                "axes": "bcyx",
                "data_type": "float32",
                "data_range": [0, 1],
                "shape": {"reference_tensor": "input0", "scale": [1, 1, 1, 1], "offset": [0] * 4},
                "postprocessing": [{"name": "sigmoid"}],
            }
        ],
        "weights": {
            "pytorch_state_dict": {
                "source": "weights_state.pt",
                "sha256": _sha(folder / "weights_state.pt"),
                "architecture": "tiny_arch.py:TinyNet",
                "architecture_sha256": _sha(folder / "tiny_arch.py"),
                "pytorch_version": "2.13",
            },
            "torchscript": {
                "source": "weights_ts.pt",
                "sha256": _sha(folder / "weights_ts.pt"),
                "parent": "pytorch_state_dict",
                "pytorch_version": "2.13",
            },
        },
    }
    (folder / "rdf.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    return folder


def tiny_expected(folder: Path, x: np.ndarray) -> np.ndarray:
    """sigmoid(conv(gain*x + offset)) computed with plain torch from the TorchScript weights."""
    import torch  # noqa: PLC0415

    net = torch.jit.load(str(folder / "weights_ts.pt"))
    with torch.no_grad():
        pre = torch.from_numpy(x.astype("float32") * TINY_GAIN + TINY_OFFSET)
        return torch.sigmoid(net(pre)).numpy().astype("float32")


def make_tiny_v05(folder: Path, *, normalize: bool) -> Path:
    """Write a format-0.5 package that accepts any batch size and sizes 16+k*16.

    With `normalize`, inputs get zero_mean_unit_variance over (channel, y, x), i.e. per sample.
    """
    torch = pytest.importorskip("torch")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny_arch.py").write_text(TINY_ARCH)
    namespace: dict = {}
    exec(TINY_ARCH, namespace)
    torch.manual_seed(1)
    net = namespace["TinyNet"]().eval()
    torch.save(net.state_dict(), folder / "weights_state.pt")
    torch.jit.trace(net, torch.zeros(1, 1, 16, 16)).save(str(folder / "weights_ts.pt"))
    x = np.random.default_rng(3).normal(5.0, 2.0, size=(2, 1, 32, 48)).astype("float32")
    np.save(folder / "test_input.npy", x)
    np.save(folder / "test_output.npy", tiny05_expected(folder, x, normalize=normalize))
    (folder / "README.md").write_text("# tiny 0.5\nA 3x3 convolution for BioEngine's tests.\n")

    def axes(ref: str | None) -> list[dict]:
        def size(axis_id: str) -> dict:
            return {"tensor_id": ref, "axis_id": axis_id} if ref else {"min": 16, "step": 16}

        return [
            {"type": "batch"},
            {"type": "channel", "channel_names": ["c0"]},
            {"type": "space", "id": "y", "size": size("y")},
            {"type": "space", "id": "x", "size": size("x")},
        ]

    pre = [{"id": "zero_mean_unit_variance", "kwargs": {"axes": ["channel", "y", "x"]}}]
    rdf = {
        "format_version": "0.5.4",
        "type": "model",
        "name": "tiny conv v05",
        "description": "a 3x3 convolution for tests",
        "authors": [{"name": "BioEngine tests"}],
        "cite": [{"text": "none", "url": "https://example.com"}],
        "documentation": "README.md",
        "license": "MIT",
        "tags": ["test"],
        "timestamp": "2024-01-01T00:00:00",
        "inputs": [
            {
                "id": "image",
                "axes": axes(None),
                "data": {"type": "float32"},
                "test_tensor": {
                    "source": "test_input.npy",
                    "sha256": _sha(folder / "test_input.npy"),
                },
                "preprocessing": pre if normalize else [],
            }
        ],
        "outputs": [
            {
                "id": "mask",
                "axes": axes("image"),
                "data": {"type": "float32"},
                "test_tensor": {
                    "source": "test_output.npy",
                    "sha256": _sha(folder / "test_output.npy"),
                },
            }
        ],
        "weights": {
            "pytorch_state_dict": {
                "source": "weights_state.pt",
                "sha256": _sha(folder / "weights_state.pt"),
                "architecture": {
                    "source": "tiny_arch.py",
                    "callable": "TinyNet",
                    "sha256": _sha(folder / "tiny_arch.py"),
                },
                "pytorch_version": "2.13",
            },
            "torchscript": {
                "source": "weights_ts.pt",
                "sha256": _sha(folder / "weights_ts.pt"),
                "parent": "pytorch_state_dict",
                "pytorch_version": "2.13",
            },
        },
    }
    (folder / "bioimageio.yaml").write_text(yaml.safe_dump(rdf, sort_keys=False))
    return folder


def tiny05_expected(folder: Path, x: np.ndarray, *, normalize: bool) -> np.ndarray:
    """conv(x), after per-sample (x - mean) / (std + 1e-6) when `normalize`, in plain numpy/torch."""
    import torch  # noqa: PLC0415

    if normalize:
        mean = x.mean(axis=(1, 2, 3), keepdims=True)
        std = x.std(axis=(1, 2, 3), keepdims=True)
        x = ((x - mean) / (std + 1e-6)).astype("float32")
    net = torch.jit.load(str(folder / "weights_ts.pt"))
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy().astype("float32")


def unet_without_processing(folder: Path) -> Path:
    """A copy of unet2d_nuclei_broad whose description has no pre/post-processing."""
    shutil.copytree(UNET, folder)
    rdf_path = folder / "bioimageio.yaml"
    rdf = yaml.safe_load(rdf_path.read_text())
    for t in rdf["inputs"]:
        t.pop("preprocessing", None)
    for t in rdf["outputs"]:
        t.pop("postprocessing", None)
    rdf_path.write_text(yaml.safe_dump(rdf, sort_keys=False))
    return folder


# ---------------------------------------------------------------- golden config files


def _check_golden(name: str, text: str) -> None:
    """Compare rendered text with tests/golden/repository/<name> (UPDATE_GOLDEN=1 rewrites)."""
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"golden file {path} missing: run with UPDATE_GOLDEN=1"
    assert text == path.read_text(), f"{name} differs from the golden file"
    _parse_model_config(text)


def _parse_model_config(text: str):
    """Parse with Triton's own ModelConfig protobuf schema: catches misspelled fields/enums."""
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    from google.protobuf import text_format  # noqa: PLC0415

    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def unet():
    return load_package(UNET)


@pytest.fixture(scope="module")
def unet_plain(tmp_path_factory):
    return load_package(unet_without_processing(tmp_path_factory.mktemp("plain") / "unet_plain"))


@pytest.fixture(scope="module")
def tiny05_plain(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny05") / "tiny05"
    return load_package(make_tiny_v05(folder, normalize=False))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_package(make_tiny_v04(tmp_path_factory.mktemp("tiny") / "tiny"))


def test_onnx_python_config_matches_golden(unet, tmp_path):
    built = build_triton_model(unet, tmp_path)
    assert (built.name, built.backend, built.weight_format) == (
        "unet2d_nuclei_broad",
        "python",
        "onnx",
    )
    assert built.max_batch_size == 8
    _check_golden("onnx_python.pbtxt", (built.path / "config.pbtxt").read_text())
    version = built.path / "1"
    assert (version / "model.py").is_file()
    assert (version / "package" / "weights.onnx").is_file()
    assert (version / "package" / "bioimageio.yaml").is_file()


def test_torchscript_python_config_matches_golden(unet, tmp_path):
    built = build_triton_model(unet, tmp_path, weight_format="torchscript", name="unet_ts")
    assert (built.name, built.backend, built.weight_format) == ("unet_ts", "python", "torchscript")
    _check_golden("torchscript_python.pbtxt", (built.path / "config.pbtxt").read_text())


def test_variable_axes_v04_config_matches_golden(tiny, tmp_path):
    built = build_triton_model(tiny, tmp_path)
    assert built.weight_format == "torchscript"  # preference: onnx > torchscript > state dict
    cfg = _parse_model_config((built.path / "config.pbtxt").read_text())
    assert list(cfg.input[0].dims) == [1, -1, -1]
    _check_golden("v04_python_variable.pbtxt", (built.path / "config.pbtxt").read_text())


def test_gpu_instance_group(unet, tmp_path):
    built = build_triton_model(unet, tmp_path, gpus=[0, 1])
    cfg = _parse_model_config((built.path / "config.pbtxt").read_text())
    assert cfg.instance_group[0].kind == cfg.instance_group[0].KIND_GPU
    assert list(cfg.instance_group[0].gpus) == [0, 1]


def test_execution_env_parameter(unet, tmp_path):
    built = build_triton_model(unet, tmp_path, execution_env="$$TRITON_MODEL_DIRECTORY/env.tar.gz")
    cfg = _parse_model_config((built.path / "config.pbtxt").read_text())
    param = cfg.parameters["EXECUTION_ENV_PATH"].string_value
    assert param == "$$TRITON_MODEL_DIRECTORY/env.tar.gz"


def test_native_onnxruntime_configs_match_golden(unet_plain, tmp_path):
    pytest.importorskip("onnxruntime")
    built = build_triton_model(
        unet_plain, tmp_path, available_backends=("python", "onnxruntime", "pytorch")
    )
    assert (built.backend, built.weight_format) == ("onnxruntime", "onnx")
    assert built.composing == ["unet_plain__onnxruntime"]
    assert built.max_batch_size == 0  # the ONNX graph fixes the batch size to 1
    _check_golden("native_onnxruntime_ensemble.pbtxt", (built.path / "config.pbtxt").read_text())
    inner = tmp_path / built.composing[0]
    _check_golden("native_onnxruntime_model.pbtxt", (inner / "config.pbtxt").read_text())
    assert (inner / "1" / "model.onnx").is_file()
    assert (built.path / "1").is_dir()


def test_native_pytorch_configs_match_golden(unet_plain, tmp_path):
    built = build_triton_model(
        unet_plain, tmp_path, backend="native", available_backends=("python", "pytorch")
    )
    assert (built.backend, built.weight_format) == ("pytorch", "torchscript")
    _check_golden("native_pytorch_ensemble.pbtxt", (built.path / "config.pbtxt").read_text())
    inner = tmp_path / built.composing[0]
    _check_golden("native_pytorch_model.pbtxt", (inner / "config.pbtxt").read_text())
    assert (inner / "1" / "model.pt").is_file()


def test_native_pytorch_with_dynamic_batching_matches_golden(tiny05_plain, tmp_path):
    built = build_triton_model(
        tiny05_plain, tmp_path, available_backends=("python", "pytorch"), max_batch_size=16
    )
    assert (built.backend, built.weight_format) == ("pytorch", "torchscript")
    _check_golden(
        "native_pytorch_batching_ensemble.pbtxt", (built.path / "config.pbtxt").read_text()
    )
    inner = (tmp_path / built.composing[0] / "config.pbtxt").read_text()
    _check_golden("native_pytorch_batching_model.pbtxt", inner)
    assert "dynamic_batching" in inner and "max_batch_size: 16" in inner


def test_no_batch_axis_means_max_batch_size_zero(tiny05_plain, tmp_path):
    built = build_triton_model(tiny05_plain, tmp_path, backend="python", max_batch_size=0)
    cfg = _parse_model_config((built.path / "config.pbtxt").read_text())
    assert cfg.max_batch_size == 0 and list(cfg.input[0].dims) == [-1, 1, -1, -1]
    assert not cfg.HasField("dynamic_batching")


def test_auto_uses_python_backend_when_the_model_has_processing(unet, tmp_path):
    built = build_triton_model(
        unet, tmp_path, available_backends=("python", "onnxruntime", "pytorch")
    )
    assert built.backend == "python"


def test_native_refuses_a_model_with_processing(unet, tmp_path):
    with pytest.raises(ModelError, match="pre/post-processing"):
        build_triton_model(unet, tmp_path, backend="native", available_backends=("onnxruntime",))


def test_native_refused_when_the_site_lacks_the_backend(unet_plain, tmp_path):
    with pytest.raises(ModelError, match="no native Triton backend"):
        build_triton_model(unet_plain, tmp_path, backend="native", available_backends=("python",))


def test_unknown_or_missing_weight_format_is_a_model_error(unet, tmp_path):
    with pytest.raises(ModelError, match="no pytorch_state_dict weights"):
        build_triton_model(unet, tmp_path, weight_format="pytorch_state_dict")
    with pytest.raises(ModelError, match="python backend"):
        build_triton_model(unet, tmp_path, available_backends=("onnxruntime",))


def test_python_paths_default_to_this_interpreter(unet, tmp_path):
    import json  # noqa: PLC0415

    import numpy  # noqa: PLC0415

    built = build_triton_model(unet, tmp_path)
    settings = json.loads((built.path / "1" / "bioengine_model.json").read_text())
    numpy_home = str(Path(numpy.__file__).resolve().parents[1])
    assert any(str(Path(p).resolve()) == numpy_home for p in settings["python_paths"])
    custom = build_triton_model(unet, tmp_path, python_paths=["/opt/env/site-packages"])
    settings = json.loads((custom.path / "1" / "bioengine_model.json").read_text())
    assert settings["python_paths"] == ["/opt/env/site-packages"]


# ---------------------------------------------------------------- real Triton


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    """A running tritonserver with the test models loaded."""

    def __init__(self, url: str, tiny_dir: Path, tiny05_dir: Path):
        import tritonclient.http as httpclient  # noqa: PLC0415

        self.url = url
        self.log_path: Path | None = None
        self.tiny_dir = tiny_dir
        self.tiny05_dir = tiny05_dir
        self.http = httpclient
        self.client = httpclient.InferenceServerClient(url.removeprefix("http://"), concurrency=4)

    def infer(self, model: str, name: str, arr: np.ndarray, output: str) -> np.ndarray:
        inp = self.http.InferInput(name, list(arr.shape), self.http.np_to_triton_dtype(arr.dtype))
        inp.set_data_from_numpy(arr, binary_data=True)
        return self.client.infer(model, [inp]).as_numpy(output)


@pytest.fixture(scope="module")
def triton(tmp_path_factory, unet):
    try:
        install = find_triton()
    except ExecutorError:
        install = None
    require_service(
        install is not None and "python" in install.backends, "tritonserver (python backend)"
    )
    repo = tmp_path_factory.mktemp("repository")
    tiny_dir = make_tiny_v04(tmp_path_factory.mktemp("pkg") / "tiny")
    tiny_pkg = load_package(tiny_dir)
    tiny05_dir = make_tiny_v05(tmp_path_factory.mktemp("pkg05") / "tiny05", normalize=True)
    built = [
        build_triton_model(unet, repo, weight_format="onnx", name="unet_onnx"),
        build_triton_model(unet, repo, weight_format="torchscript", name="unet_torchscript"),
        build_triton_model(tiny_pkg, repo, name="tiny04"),
        build_triton_model(tiny_pkg, repo, weight_format="pytorch_state_dict", name="tiny04_sd"),
        build_triton_model(load_package(tiny05_dir), repo, name="tiny05"),
    ]
    http_port = _free_port()
    args = triton_args(
        install,
        str(repo),
        http_port=http_port,
        grpc_port=_free_port(),
        metrics_port=_free_port(),
        models=[b.name for b in built],
    )
    log_path = repo.parent / "triton.log"
    env = {**os.environ, **install.env}
    with log_path.open("w") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"
    served = None
    try:
        if not wait_ready(url, timeout=180):
            pytest.fail(f"tritonserver not ready; log:\n{log_path.read_text()[-4000:]}")
        served = Served(url, tiny_dir, tiny05_dir)
        served.log_path = log_path
        yield served
    finally:
        if served is not None:
            served.client.close()  # an open keep-alive connection delays Triton's exit
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.triton
@pytest.mark.parametrize("model", ["unet_onnx", "unet_torchscript"])
def test_serving_reproduces_the_packaged_test_output(triton, model):
    x = np.load(UNET / "test_input.npy")
    expected = np.load(UNET / "test_output.npy")
    got = triton.infer(model, "raw", x, "probability")
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.triton
def test_a_batch_is_split_to_the_batch_size_the_weights_accept(triton):
    x = np.load(UNET / "test_input.npy")
    expected = np.load(UNET / "test_output.npy")
    flipped = np.ascontiguousarray(x[..., ::-1])
    got = triton.infer("unet_onnx", "raw", np.concatenate([x, flipped]), "probability")
    assert got.shape == (2, 1, 512, 512)
    np.testing.assert_allclose(got[:1], expected, atol=1e-4, rtol=1e-4)
    single = triton.infer("unet_onnx", "raw", flipped, "probability")
    np.testing.assert_allclose(got[1:], single, atol=1e-5, rtol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("model", ["tiny04", "tiny04_sd"])
def test_format_04_package_serves_with_processing_applied_once(triton, model):
    x = np.load(triton.tiny_dir / "test_input.npy")
    expected = np.load(triton.tiny_dir / "test_output.npy")
    np.testing.assert_allclose(
        triton.infer(model, "input0", x, "output0"), expected, atol=1e-5, rtol=1e-5
    )
    bigger = np.random.default_rng(1).integers(0, 255, size=(3, 1, 48, 64), dtype=np.uint8)
    np.testing.assert_allclose(
        triton.infer(model, "input0", bigger, "output0"),
        tiny_expected(triton.tiny_dir, bigger),
        atol=1e-5,
        rtol=1e-5,
    )


@pytest.mark.triton
def test_format_05_batch_runs_at_once_with_per_sample_normalization(triton):
    x = np.load(triton.tiny05_dir / "test_input.npy")
    expected = np.load(triton.tiny05_dir / "test_output.npy")
    np.testing.assert_allclose(
        triton.infer("tiny05", "image", x, "mask"), expected, atol=1e-4, rtol=1e-4
    )
    x3 = np.random.default_rng(4).normal(0, 30, size=(3, 1, 16, 64)).astype("float32")
    np.testing.assert_allclose(
        triton.infer("tiny05", "image", x3, "mask"),
        tiny05_expected(triton.tiny05_dir, x3, normalize=True),
        atol=1e-4,
        rtol=1e-4,
    )


@pytest.mark.triton
def test_concurrent_requests_each_get_their_own_answer(triton):
    rng = np.random.default_rng(2)
    arrays = [rng.integers(0, 255, size=(1, 1, 32, 32), dtype=np.uint8) for _ in range(8)]
    pending = []
    for arr in arrays:
        inp = triton.http.InferInput("input0", list(arr.shape), "UINT8")
        inp.set_data_from_numpy(arr, binary_data=True)
        pending.append(triton.client.async_infer("tiny04", [inp]))
    for arr, req in zip(arrays, pending, strict=False):
        got = req.get_result().as_numpy("output0")
        np.testing.assert_allclose(got, tiny_expected(triton.tiny_dir, arr), atol=1e-5, rtol=1e-5)


def _error_of(triton, model, name, arr, output) -> str:
    from tritonclient.utils import InferenceServerException  # noqa: PLC0415

    with pytest.raises(InferenceServerException) as info:
        triton.infer(model, name, arr, output)
    return str(info.value)


@pytest.mark.triton
def test_wrong_shape_and_dtype_are_clear_errors_and_the_server_keeps_serving(triton):
    msg = _error_of(
        triton, "unet_onnx", "raw", np.zeros((1, 1, 256, 256), "float32"), "probability"
    )
    assert "unet_onnx" in msg and "raw" in msg and "512" in msg
    msg = _error_of(
        triton, "unet_onnx", "raw", np.zeros((1, 1, 512, 512), "float64"), "probability"
    )
    assert "unet_onnx" in msg and "raw" in msg and "FP32" in msg
    msg = _error_of(triton, "tiny04", "input0", np.zeros((1, 1, 20, 32), "uint8"), "output0")
    assert "tiny04" in msg and "input0" in msg and "16+k*16" in msg
    msg = _error_of(triton, "unet_onnx", "image", np.zeros((1, 1, 512, 512), "float32"), "raw")
    assert "unet_onnx" in msg and "image" in msg
    x = np.load(UNET / "test_input.npy")
    np.testing.assert_allclose(
        triton.infer("unet_onnx", "raw", x, "probability"),
        np.load(UNET / "test_output.npy"),
        atol=1e-4,
        rtol=1e-4,
    )


@pytest.mark.triton
def test_models_import_numpy_from_the_serving_environment(triton):
    import numpy  # noqa: PLC0415

    log = triton.log_path.read_text()
    home = str(Path(numpy.__file__).resolve().parent)
    for model in ("unet_onnx", "unet_torchscript", "tiny04", "tiny04_sd", "tiny05"):
        assert f"model '{model}' ready" in log
    assert f"from {home})" in log
    assert "imported numpy from" not in log
