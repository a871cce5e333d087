"""A plain `pip install bioengine` has a model to start from: the bundled packages are in the
wheel, `bioengine models example` writes a site config serving them, and it serves correctly."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from core_helpers import ROOT, free_port, run_cli, triton_available

from bioengine_core.testing.pytest_plugin import require_service


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory) -> Path:
    """The core built as a wheel and unpacked into its own directory (what pip installs)."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = out.glob("bioengine-*.whl")
    target = out / "site-packages"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    return target


def _python(
    target: Path, *args: str, cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess:
    """Run Python with the wheel's copy of the core first on the path (plugins from the venv)."""
    env = {**os.environ, "PYTHONPATH": str(target), "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_wheel_ships_every_file_the_bundled_descriptions_list(wheel_install):
    bundled = wheel_install / "bioengine_core" / "bundled_models"
    names = sorted(p.name for p in bundled.iterdir() if (p / "bioimageio.yaml").is_file())
    assert names == ["tiny_affine", "unet2d_nuclei_broad"]
    for name in names:
        rdf = yaml.safe_load((bundled / name / "bioimageio.yaml").read_text())
        for fmt, entry in rdf["weights"].items():
            data = (bundled / name / entry["source"]).read_bytes()
            assert data == (ROOT / "models" / name / entry["source"]).read_bytes(), (name, fmt)
            if "sha256" in entry:
                assert hashlib.sha256(data).hexdigest() == entry["sha256"], (name, fmt)
        for tensor in rdf["inputs"] + rdf["outputs"]:
            assert (bundled / name / tensor["test_tensor"]["source"]).is_file()


def test_models_example_from_the_wheel_serves_the_bundled_model(wheel_install, tmp_path):
    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    cli = ("-c", "from bioengine_core.cli import main; main()")
    where = _python(wheel_install, "-c", "import bioengine_core; print(bioengine_core.__file__)",
                    cwd=tmp_path)  # fmt: skip
    assert where.stdout.strip().startswith(str(wheel_install)), where
    listed = _python(wheel_install, *cli, "models", "bundled", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert {"bundled:unet2d_nuclei_broad", "bundled:tiny_affine"} <= {
        row["source"] for row in json.loads(listed.stdout)
    }
    port = free_port()
    made = _python(wheel_install, *cli, "models", "example", "-o", "site.toml",
                   "--port", str(port), cwd=tmp_path)  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "bioengine serve --config site.toml" in made.stdout
    again = _python(wheel_install, *cli, "models", "example", "-o", "site.toml", cwd=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr
    checked = _python(wheel_install, *cli, "config", "check", "-c", "site.toml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr

    env = {**os.environ, "PYTHONPATH": str(wheel_install), "COLUMNS": "200"}
    serve = subprocess.Popen(
        [sys.executable, *cli, "serve", "-c", "site.toml"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        lines = []
        for line in serve.stdout:
            lines.append(line)
            if "Stop with Ctrl-C" in line or len(lines) > 500:
                break
        assert "is serving 1 model(s): unet2d-nuclei-broad" in "".join(lines) or any(
            "is serving 1 model(s)" in x for x in lines
        ), "".join(lines)
        model_dir = wheel_install / "bioengine_core" / "bundled_models" / "unet2d_nuclei_broad"
        model_id = next(x for x in lines if "is serving" in x).rsplit(": ", 1)[1].strip()
        result = run_cli(
            "infer", "--url", f"http://127.0.0.1:{port}", "--model", model_id,
            "--input", str(model_dir / "test_input.npy"), "--output", str(tmp_path / "out.npy"),
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        expected = np.load(model_dir / "test_output.npy")
        np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-4)
    finally:
        serve.terminate()
        serve.wait(timeout=90)
    assert not (ROOT / "site.toml").exists()


def test_unknown_bundled_model_is_named_with_the_choices(tmp_path):
    result = run_cli("models", "example", "-m", "nope", "-o", str(tmp_path / "s.toml"))
    assert result.returncode == 2
    assert "no bundled model 'nope'" in result.stderr
    assert "unet2d_nuclei_broad" in result.stderr
    assert not (tmp_path / "s.toml").exists()
