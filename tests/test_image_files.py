"""`bioengine infer` with image files: a TIFF of any size (OME-TIFF axes, a plain 2D TIFF, a
PNG) through a real deployment, the output written as TIFF with the input's spatial size and
equal to the .npy path's answer; axes that cannot be mapped are one clear line."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from core_helpers import ROOT, Serve, free_port, local_config, run_cli, triton_available
from PIL import Image

from bioengine_core.imagefiles import ImageFileError, map_axes, read_image
from bioengine_core.testing.pytest_plugin import require_service

UNET = ROOT / "models" / "unet2d_nuclei_broad"
AXES = ["batch", "channel", "y", "x"]


def test_axes_are_mapped_or_refused_naming_the_axis(tmp_path):
    img = np.random.default_rng(0).random((30, 40), np.float32)
    assert map_axes(img, "yx", AXES, name="raw", model="m").shape == (1, 1, 30, 40)
    stack = np.zeros((5, 30, 40), np.float32)
    with pytest.raises(ImageFileError, match="has no axis 'z'"):
        map_axes(stack, "zyx", AXES, name="raw", model="m")
    assert map_axes(stack, "cyx", AXES, name="raw", model="m").shape == (1, 5, 30, 40)
    with pytest.raises(ImageFileError, match="give --axes"):
        map_axes(np.zeros((2, 3, 4, 5, 6)), None, AXES, name="raw", model="m")
    rgb = np.zeros((30, 40, 3), np.uint8)
    assert map_axes(rgb, "yxc", AXES, name="raw", model="m").shape == (1, 3, 30, 40)
    tifffile.imwrite(tmp_path / "z.tif", stack, metadata={"axes": "ZYX"})
    arr, axes = read_image(tmp_path / "z.tif")
    assert axes == "zyx" and arr.shape == (5, 30, 40)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    assert read_image(tmp_path / "rgb.png")[1] == "yxc"
    (tmp_path / "bad.tif").write_bytes(b"not a tiff")
    with pytest.raises(ImageFileError, match="not a readable .tif file"):
        read_image(tmp_path / "bad.tif")


def test_infer_reads_and_writes_tiff_of_any_size(tmp_path):
    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    port = free_port()
    serve = Serve(local_config(tmp_path, port=port, name="images"))
    url = f"http://127.0.0.1:{port}"
    base = np.load(UNET / "test_input.npy")[0, 0]
    image = np.tile(base, (2, 2))[:700, :900].astype(np.float32)
    tifffile.imwrite(tmp_path / "cells.ome.tif", image, ome=True, metadata={"axes": "YX"})
    tifffile.imwrite(tmp_path / "plain.tif", image)
    np.save(tmp_path / "cells.npy", image[None, None])
    try:
        serve.wait_serving()
        results = {}
        for name, src in [("npy", "cells.npy"), ("ome", "cells.ome.tif"), ("plain", "plain.tif")]:
            out = tmp_path / f"out-{name}.tif"
            done = run_cli(
                "infer", "--url", url, "-m", "unet2d_nuclei_broad",
                "-i", str(tmp_path / src), "-o", str(out),
            )  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr
            results[name] = tifffile.imread(out)
        assert results["npy"].shape == (1, 700, 900)  # batch dropped, channel kept (CYX)
        for name in ("ome", "plain"):
            np.testing.assert_allclose(results[name], results["npy"], atol=1e-5)
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "rgb.png")
        refused = run_cli(
            "infer", "--url", url, "-m", "unet2d_nuclei_broad",
            "-i", str(tmp_path / "rgb.png"), "-o", str(tmp_path / "x.tif"),
        )  # fmt: skip
        assert refused.returncode == 1
        line = refused.stderr.strip().splitlines()[-1]
        assert "unet2d_nuclei_broad" in line and "'raw'" in line and "channel" in line, line
    finally:
        serve.stop()
