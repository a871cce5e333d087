"""Loading and validating bioimage.io model packages; checking request tensors against them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from bioengine_core.errors import InvalidInputError, ModelError
from bioengine_core.modelpkg import has_processing, load_package, validate_inputs

ROOT = Path(__file__).resolve().parents[1]
UNET = (ROOT / "models" / "unet2d_nuclei_broad").resolve()  # models/ links into the package


def _variant(tmp_path: Path, edit, name: str = "variant") -> Path:
    """A copy of unet2d_nuclei_broad whose bioimageio.yaml was changed by `edit(rdf)`."""
    folder = tmp_path / name
    shutil.copytree(UNET, folder)
    rdf_path = folder / "bioimageio.yaml"
    rdf = yaml.safe_load(rdf_path.read_text())
    edit(rdf)
    rdf_path.write_text(yaml.safe_dump(rdf, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def unet():
    return load_package(UNET)


def test_unet_package_is_digested(unet):
    assert unet.id == "unet2d_nuclei_broad"
    assert unet.name == "UNet 2D Nuclei Broad"
    assert unet.format_version == "0.5.4"
    assert unet.weight_formats == ["onnx", "torchscript"]
    assert "segmentation" in unet.tags
    assert unet.rdf["type"] == "model"
    (raw,) = unet.inputs
    assert (raw.id, raw.dtype, raw.shape, raw.axes) == (
        "raw",
        "float32",
        [-1, 1, 512, 512],
        ["batch", "channel", "y", "x"],
    )
    assert raw.has_batch and raw.batch_size == 1
    (prob,) = unet.outputs
    assert (prob.id, prob.shape) == ("probability", [-1, 1, 512, 512])  # size references resolved
    assert unet.test_inputs == {"raw": UNET / "test_input.npy"}
    assert unet.test_outputs == {"probability": UNET / "test_output.npy"}
    assert has_processing(unet)


def test_package_can_be_named_by_its_description_file_and_given_an_id():
    pkg = load_package(UNET / "bioimageio.yaml", model_id="nuclei/v1 test")
    assert pkg.id == "nuclei_v1_test"
    assert pkg.root == UNET


def test_missing_folder_and_folder_without_description_are_model_errors(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        load_package(tmp_path / "nope")
    with pytest.raises(ModelError, match="not a bioimage.io model package"):
        load_package(tmp_path)


def test_invalid_description_is_a_readable_model_error(tmp_path):
    def break_axes(rdf):
        rdf["inputs"][0]["axes"][2]["size"] = "large"

    with pytest.raises(ModelError) as info:
        load_package(_variant(tmp_path, break_axes))
    msg = str(info.value)
    assert "invalid bioimage.io model package" in msg and "bioimageio.yaml" in msg
    assert "inputs.0.axes" in msg


def test_corrupt_weights_fail_the_hash_check(tmp_path):
    folder = _variant(tmp_path, lambda rdf: None)
    (folder / "weights.onnx").write_bytes(b"not an onnx file")
    with pytest.raises(ModelError, match="sha256|SHA256|hash"):
        load_package(folder)


def test_a_non_model_description_is_refused(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    (folder / "rdf.yaml").write_text(yaml.safe_dump({"type": "dataset", "name": "d"}))
    with pytest.raises(ModelError, match="not a model"):
        load_package(folder)


def test_valid_inputs_pass(unet):
    validate_inputs(unet, {"raw": np.zeros((1, 1, 512, 512), np.float32)})
    validate_inputs(unet, {"raw": np.zeros((3, 1, 512, 512), np.float32)})  # any batch size


@pytest.mark.parametrize(
    ("arr", "fragment"),
    [
        (np.zeros((1, 1, 512, 256), np.float32), "axis 'x' must have size 512"),
        (np.zeros((1, 512, 512), np.float32), "has 3 dimensions, expected 4"),
        (np.zeros((1, 1, 512, 512), np.uint8), "wrong dtype"),
    ],
)
def test_invalid_inputs_name_model_tensor_expected_and_got(unet, arr, fragment):
    with pytest.raises(InvalidInputError) as info:
        validate_inputs(unet, {"raw": arr})
    msg = str(info.value)
    assert fragment in msg
    assert "model 'unet2d_nuclei_broad'" in msg and "input 'raw'" in msg
    assert "expected shape [batch, 1, 512, 512]" in msg and "dtype float32" in msg
    assert f"got shape {list(arr.shape)} dtype {arr.dtype.name}" in msg
    assert info.value.status == 400


def test_missing_and_unknown_inputs_are_named(unet):
    with pytest.raises(InvalidInputError, match="missing 'raw'; unknown 'image'"):
        validate_inputs(unet, {"image": np.zeros((1, 1, 512, 512), np.float32)})


def test_parameterized_sizes_check_min_and_step(tmp_path):
    def parameterize(rdf):
        for axis in rdf["inputs"][0]["axes"][2:]:
            axis["size"] = {"min": 128, "step": 16}

    pkg = load_package(_variant(tmp_path, parameterize))
    (raw,) = pkg.inputs
    assert raw.shape == [-1, 1, -1, -1]
    assert raw.min_shape[2:] == [128, 128] and raw.step[2:] == [16, 16]
    assert pkg.outputs[0].shape == [-1, 1, -1, -1]  # references to variable axes stay variable
    validate_inputs(pkg, {"raw": np.zeros((1, 1, 128, 144), np.float32)})
    with pytest.raises(InvalidInputError, match=r"axis 'y' must have size 128 \+ k\*16"):
        validate_inputs(pkg, {"raw": np.zeros((1, 1, 130, 144), np.float32)})
    with pytest.raises(InvalidInputError, match="axis 'x' must have size >= 128"):
        validate_inputs(pkg, {"raw": np.zeros((1, 1, 128, 112), np.float32)})


def test_a_package_without_processing_is_recognised(tmp_path):
    def strip(rdf):
        rdf["inputs"][0].pop("preprocessing")
        rdf["outputs"][0].pop("postprocessing")

    assert not has_processing(load_package(_variant(tmp_path, strip)))

    def only_noop_dtype(rdf):
        rdf["inputs"][0]["preprocessing"] = [{"id": "ensure_dtype", "kwargs": {"dtype": "float32"}}]
        rdf["outputs"][0].pop("postprocessing")

    assert not has_processing(load_package(_variant(tmp_path, only_noop_dtype, "noop")))
