"""TensorFlow weights (`tensorflow_saved_model_bundle`, `keras_hdf5`) through Triton's python backend.

The test builds a small Keras model itself (a 3x3 convolution with a sigmoid, behind a
`scale_linear` preprocessing), packages it as bioimage.io 0.5 packages (one with only keras_hdf5
weights, one with only a zipped SavedModel), checks them with bioimageio.core's own model test,
serves both with `bioengine serve` (local executor, real Triton) and asks with a stock
`tritonclient.http` client. Without TensorFlow in the serving environment, such a package is
refused with an error naming the model and the extra to install.

Building runs in a subprocess (this file run as a script), so pytest's process never imports
TensorFlow.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

GAIN, OFFSET = 2.0, -1.0
"""The packages' preprocessing: scale_linear, applied once, by the served model."""
FORMATS = {"keras_hdf5": "tiny_keras_h5", "tensorflow_saved_model_bundle": "tiny_tf_bundle"}
"""Weight format -> id of the package that has only that format."""


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_description(folder: Path, weights: dict, tf_version: str = "2.21") -> Path:
    """Write `folder/rdf.yaml`: a 0.5 description of the b,y,x,c convolution with `weights`
    ({format: file name}); the test tensors must be in `folder` already."""
    (folder / "README.md").write_text("# tiny keras\nA 3x3 convolution for BioEngine's tests.\n")

    def axes(channels: list[str], ref: str | None) -> list[dict]:
        space = [
            {"type": "space", "id": a, "size": {"tensor_id": ref, "axis_id": a} if ref else 64}
            for a in ("y", "x")
        ]
        return [{"type": "batch"}, *space, {"type": "channel", "channel_names": channels}]

    def test_tensor(name: str) -> dict:
        return {"source": name, "sha256": _sha(folder / name)}

    entries = {}
    for wf, name in weights.items():
        entries[wf] = {"source": name, "sha256": _sha(folder / name)}
        if wf == "onnx":
            entries[wf]["opset_version"] = 17
        else:
            entries[wf]["tensorflow_version"] = tf_version
    rdf = {
        "format_version": "0.5.4",
        "type": "model",
        "id": folder.name,
        "name": f"{folder.name} (BioEngine tests)",
        "description": "a 3x3 convolution and a sigmoid, in Keras",
        "authors": [{"name": "BioEngine tests"}],
        "cite": [{"text": "none", "url": "https://example.com"}],
        "documentation": "README.md",
        "license": "MIT",
        "tags": ["test"],
        "timestamp": "2024-01-01T00:00:00",
        "inputs": [
            {
                "id": "image",
                "axes": axes(["c0"], None),
                "data": {"type": "float32"},
                "test_tensor": test_tensor("test_input.npy"),
                "preprocessing": [
                    {"id": "scale_linear", "kwargs": {"gain": GAIN, "offset": OFFSET}}
                ],
            }
        ],
        "outputs": [
            {
                "id": "prob",
                "axes": axes(["p0", "p1"], "image"),
                "data": {"type": "float32"},
                "test_tensor": test_tensor("test_output.npy"),
            }
        ],
        "weights": entries,
    }
    path = folder / "rdf.yaml"
    path.write_text(yaml.safe_dump(rdf, sort_keys=False))
    return path


def build_packages(root: Path) -> dict[str, Path]:
    """Build the Keras model and write one package per weight format under `root` (imports
    TensorFlow: run it in its own process); check each with bioimageio.core's model test."""
    import os
    import shutil
    import zipfile

    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import tensorflow as tf
    from bioimageio.core import test_model
    from bioimageio.spec import load_description
    from bioimageio.spec.model import v0_5

    rng = np.random.default_rng(0)
    inp = keras.Input((None, None, 1), name="image")
    conv = keras.layers.Conv2D(2, 3, padding="same", activation="sigmoid", name="conv")
    model = keras.Model(inp, conv(inp))
    kernel = rng.normal(0.0, 0.5, (3, 3, 1, 2)).astype("float32")
    conv.set_weights([kernel, np.array([0.1, -0.2], "float32")])

    x = rng.normal(0.0, 1.0, (1, 64, 64, 1)).astype("float32")
    y = model.predict(x * np.float32(GAIN) + np.float32(OFFSET), verbose=0).astype("float32")
    tf_version = ".".join(tf.__version__.split(".")[:2])
    made = {}
    for wf, model_id in FORMATS.items():
        folder = root / model_id
        folder.mkdir(parents=True)
        np.save(folder / "test_input.npy", x)
        np.save(folder / "test_output.npy", y)
        if wf == "keras_hdf5":
            name = "weights.h5"
            model.save(folder / name)
        else:  # a SavedModel whose serving_default signature returns {output id: tensor}, zipped
            name = "tf_weights.zip"

            @tf.function(input_signature=[tf.TensorSpec([None, None, None, 1], tf.float32)])
            def serve(image):
                return {"prob": model(image, training=False)}

            module = tf.Module()
            module.model = model
            saved = root / f"{model_id}_saved_model"
            tf.saved_model.save(module, str(saved), signatures={"serving_default": serve})
            with zipfile.ZipFile(folder / name, "w") as zf:
                for path in sorted(saved.rglob("*")):
                    zf.write(path, path.relative_to(saved).as_posix())
            shutil.rmtree(saved)
        rdf = write_description(folder, {wf: name}, tf_version)
        descr = load_description(rdf, format_version="discover")
        assert isinstance(descr, v0_5.ModelDescr), descr.validation_summary.display() or rdf
        summary = test_model(rdf, weight_format=wf)
        assert summary.status == "passed", summary.display() or wf
        made[wf] = folder
    return made


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, Path]:
    """The two packages, built by this file run as a script (TensorFlow stays out of pytest)."""
    from bioengine_core.testing.pytest_plugin import require_service

    require_service(
        importlib.util.find_spec("tensorflow") is not None,
        "TensorFlow (pip install 'bioengine[tensorflow]')",
    )
    root = tmp_path_factory.mktemp("tfpkg")
    result = subprocess.run(
        [sys.executable, __file__, str(root)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    return {wf: root / model_id for wf, model_id in FORMATS.items()}


# ---------------------------------------------------------------- without TensorFlow


def _fake_package(folder: Path, weights: dict[str, str]) -> Path:
    """A valid package whose weight files are placeholder bytes (building never reads them)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    np.save(folder / "test_input.npy", rng.random((1, 64, 64, 1), "float32"))
    np.save(folder / "test_output.npy", rng.random((1, 64, 64, 2), "float32"))
    for name in weights.values():
        (folder / name).write_bytes(b"placeholder weights")
    write_description(folder, weights)
    return folder


@pytest.mark.parametrize("wf", list(FORMATS))
def test_tensorflow_weights_without_tensorflow_name_the_model_and_the_extra(tmp_path, wf):
    from bioengine_core.errors import ModelError
    from bioengine_core.modelpkg import load_package
    from bioengine_core.repository import build_triton_model

    name = {"keras_hdf5": "weights.h5", "tensorflow_saved_model_bundle": "tf_weights.zip"}[wf]
    pkg = load_package(_fake_package(tmp_path / "only_tf", {wf: name}))
    bare_env = tmp_path / "site-packages"  # a serving environment without TensorFlow
    bare_env.mkdir()
    for wanted in (None, wf):
        with pytest.raises(ModelError) as err:
            build_triton_model(
                pkg, tmp_path / "repo", weight_format=wanted, python_paths=[str(bare_env)]
            )
        text = str(err.value)
        assert "model 'only_tf'" in text and wf in text, text
        assert "pip install 'bioengine[tensorflow]'" in text, text
        assert str(bare_env) in text, text
    assert not (tmp_path / "repo" / "only_tf").exists()  # nothing half-built


def test_other_weights_are_preferred_and_served_without_tensorflow(tmp_path):
    from bioengine_core.modelpkg import load_package
    from bioengine_core.repository import build_triton_model

    pkg = load_package(
        _fake_package(tmp_path / "both", {"keras_hdf5": "weights.h5", "onnx": "weights.onnx"})
    )
    bare_env = tmp_path / "site-packages"
    bare_env.mkdir()
    built = build_triton_model(
        pkg, tmp_path / "repo", python_paths=[str(bare_env)], backend="python"
    )
    assert built.weight_format == "onnx"


def test_tensorflow_formats_come_after_onnx_and_torch():
    from bioengine_core.util import WEIGHT_FORMATS

    assert WEIGHT_FORMATS == (
        "onnx",
        "torchscript",
        "pytorch_state_dict",
        "tensorflow_saved_model_bundle",
        "keras_hdf5",
    )


# ---------------------------------------------------------------- served by Triton


@pytest.fixture(scope="module")
def served(packages, tmp_path_factory):
    """`bioengine serve` (local executor, one Triton) with both packages."""
    from core_helpers import Serve, free_port, triton_available

    from bioengine_core.testing.pytest_plugin import require_service

    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    tmp = tmp_path_factory.mktemp("tfserve")
    port = free_port()
    models = "".join(f'[[models]]\nsource = "folder:{packages[wf]}"\n' for wf in sorted(packages))
    config = tmp / "site.toml"
    config.write_text(
        f'[engine]\nname = "tf"\nstate_dir = "{tmp / "state"}"\nreplicas = 1\n'
        f"health_interval = 0.5\nstop_grace = 5\n\n"
        f'[executor]\nkind = "local"\nmode = "process"\n\n[storage]\nkind = "local"\n\n'
        f'[gateways.http]\nkind = "http"\nport = {port}\n\n{models}'
    )
    serve = Serve(config)
    try:
        serve.wait_serving(timeout=300)
        yield f"127.0.0.1:{port}", tmp / "state"
    finally:
        serve.stop()
        print(serve.output)


@pytest.mark.triton
@pytest.mark.parametrize("wf", list(FORMATS))
def test_stock_tritonclient_reproduces_the_test_output(served, packages, wf):
    import tritonclient.http as tc

    address, _ = served
    model_id = FORMATS[wf]
    x = np.load(packages[wf] / "test_input.npy")
    expected = np.load(packages[wf] / "test_output.npy")
    client = tc.InferenceServerClient(address, network_timeout=120)
    try:
        assert client.is_model_ready(model_id)
        meta = client.get_model_metadata(model_id)
        assert [t["name"] for t in meta["inputs"]] == ["image"]
        for batch in (x, np.concatenate([x, x[:, ::-1]])):  # one sample, then a batch of two
            inp = tc.InferInput("image", list(batch.shape), "FP32")
            inp.set_data_from_numpy(batch, binary_data=True)
            result = client.infer(model_id, [inp], outputs=[tc.InferRequestedOutput("prob")])
            got = result.as_numpy("prob")
            assert got.shape == (len(batch), 64, 64, 2)
            np.testing.assert_allclose(got[:1], expected, atol=1e-4, rtol=1e-4)
        flipped = np.ascontiguousarray(x[:, ::-1])
        single = tc.InferInput("image", list(flipped.shape), "FP32")
        single.set_data_from_numpy(flipped, binary_data=True)
        alone = client.infer(model_id, [single]).as_numpy("prob")
        np.testing.assert_allclose(got[1:], alone, atol=1e-5, rtol=1e-5)
    finally:
        client.close()


@pytest.mark.triton
def test_status_names_the_tensorflow_weights_and_nothing_is_unzipped_in_place(served):
    import urllib.request

    from core_helpers import ROOT

    address, state = served
    with urllib.request.urlopen(f"http://{address}/bioengine/status", timeout=10) as resp:
        status = json.loads(resp.read())
    formats = {m["id"]: m["weight_format"] for m in status["models"]}
    assert formats == {model_id: wf for wf, model_id in FORMATS.items()}, status["models"]
    # bioimageio.core unzips a SavedModel under the working directory: the model used its own
    assert not list(state.rglob("bioimageio_unzipped_tf_weights"))
    assert not (ROOT / "bioimageio_unzipped_tf_weights").exists()


@pytest.fixture(scope="module")
def runner_triton(packages, tmp_path_factory):
    """A Triton whose shared runner (catalog mode's) hosts both packages next to an ONNX model,
    loaded one after the other as catalog mode loads them."""
    import os
    import signal

    from core_helpers import ROOT, free_port, triton_available

    from bioengine_core.modelpkg import load_package
    from bioengine_core.repository import build_triton_model
    from bioengine_core.runner import build_runner
    from bioengine_core.testing.pytest_plugin import require_service
    from bioengine_core.triton import find_triton, triton_args, wait_ready

    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    install = find_triton()
    repo = tmp_path_factory.mktemp("runner_repo")
    names = [build_runner(repo).name]
    unet = load_package(ROOT / "models" / "unet2d_nuclei_broad")
    for pkg in [load_package(packages[wf]) for wf in FORMATS] + [unet]:
        names.append(build_triton_model(pkg, repo, backend="python", shared_runner=True).name)
    http_port = free_port()
    args = triton_args(
        install,
        str(repo),
        http_port=http_port,
        grpc_port=free_port(),
        metrics_port=free_port(),
        models=names[:1],
    )
    log_path = repo.parent / "triton.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            args, env={**os.environ, **install.env}, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        if not wait_ready(f"http://127.0.0.1:{http_port}", timeout=180):
            pytest.fail(f"tritonserver not ready; log:\n{log_path.read_text()[-4000:]}")
        import tritonclient.http as tc

        client = tc.InferenceServerClient(f"127.0.0.1:{http_port}", network_timeout=180)
        try:
            for name in names[1:]:
                client.load_model(name)
        finally:
            client.close()
        yield f"127.0.0.1:{http_port}", log_path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.mark.triton
def test_the_shared_runner_hosts_tensorflow_models_next_to_onnx(runner_triton, packages):
    import tritonclient.http as tc
    from core_helpers import ROOT

    address, log_path = runner_triton
    client = tc.InferenceServerClient(address, network_timeout=120)
    try:
        for wf, model_id in FORMATS.items():
            x = np.load(packages[wf] / "test_input.npy")
            inp = tc.InferInput("image", list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=True)
            got = client.infer(model_id, [inp]).as_numpy("prob")
            expected = np.load(packages[wf] / "test_output.npy")
            np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
        unet = ROOT / "models" / "unet2d_nuclei_broad"
        x = np.load(unet / "test_input.npy")
        inp = tc.InferInput("raw", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        got = client.infer("unet2d_nuclei_broad", [inp]).as_numpy("probability")
        np.testing.assert_allclose(got, np.load(unet / "test_output.npy"), atol=1e-4, rtol=1e-4)
    finally:
        client.close()
    assert log_path.read_text().count("runs in the shared runner") == 3


if __name__ == "__main__":
    print(json.dumps({wf: str(p) for wf, p in build_packages(Path(sys.argv[1])).items()}))
