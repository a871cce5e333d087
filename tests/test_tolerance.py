"""Model tests judged by the package's own reproducibility tolerance, and `bioengine test`.

The rule on arrays, which declared entry applies to which output and weight format (checked
against bioimageio.core's own choice), the defaults, a package variant that declares one, the
command's package lookup (bundled, zoo, --package) and, with a real Triton, `bioengine test`
passing for the bundled model and failing for a package whose test output was perturbed.
"""

from __future__ import annotations

import copy
import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import typer
import yaml
from bioimageio.spec.model import v0_4, v0_5
from core_helpers import (
    ROOT,
    Serve,
    free_port,
    get_status,
    local_config,
    run_cli,
    triton_available,
    wait_for,
)

from bioengine_core.modelpkg import load_package
from bioengine_core.testing.pytest_plugin import require_service
from bioengine_core.tolerance import (
    V04_ATOL,
    V04_MISMATCHED_PER_MILLION,
    V04_RTOL,
    Tolerance,
    compare,
    judge,
    summary_line,
    tolerance_for,
)

UNET = (ROOT / "models" / "unet2d_nuclei_broad").resolve()
Y = np.load(UNET / "test_output.npy")


def _variant(tmp_path: Path, edit, name: str = "variant") -> Path:
    """A copy of unet2d_nuclei_broad whose bioimageio.yaml was changed by `edit(rdf)`."""
    folder = tmp_path / name
    shutil.copytree(UNET, folder)
    rdf_path = folder / "bioimageio.yaml"
    rdf = yaml.safe_load(rdf_path.read_text())
    edit(rdf)
    rdf_path.write_text(yaml.safe_dump(rdf, sort_keys=False))
    return folder


def _declare(*entries: dict):
    """An `edit` that declares `entries` as config.bioimageio.reproducibility_tolerance."""

    def edit(rdf: dict) -> None:
        rdf.setdefault("config", {}).setdefault("bioimageio", {})["reproducibility_tolerance"] = (
            list(entries)
        )

    return edit


def _perturbed(tmp_path: Path, count: int, delta: float, *entries: dict) -> Path:
    """A variant declaring `entries` whose test output has `count` elements off by `delta`."""
    folder = _variant(tmp_path, _declare(*entries), name="unet_perturbed")
    y = Y.copy()
    flat = y.reshape(-1)
    flat[np.flatnonzero((flat > 0.1) & (flat < 0.8))[:count]] += delta
    np.save(folder / "test_output.npy", y)
    rdf_path = folder / "bioimageio.yaml"
    rdf = yaml.safe_load(rdf_path.read_text())
    digest = hashlib.sha256((folder / "test_output.npy").read_bytes()).hexdigest()
    rdf["outputs"][0]["test_tensor"]["sha256"] = digest
    rdf_path.write_text(yaml.safe_dump(rdf, sort_keys=False))
    return folder


def _tol(rtol: float = 0.0, atol: float = 0.0, ppm: float = 0.0) -> Tolerance:
    return Tolerance(rtol, atol, ppm, "test")


# ------------------------------------------------------------------------- the rule on arrays
def test_an_element_is_mismatched_only_beyond_atol_plus_rtol_times_expected():
    expected = np.array([0.0, 1.0, 10.0, -10.0])
    tol = _tol(rtol=0.5, atol=0.25)  # binary fractions: the bounds are exact
    at_bound = expected + np.array([0.25, 0.75, 5.25, -5.25])
    report = compare(at_bound, expected, tol)
    assert report["passed"] and report["mismatched_elements"] == 0
    assert report["max_abs_error"] == 5.25
    beyond = at_bound + np.array([0.0, 0.0, 0.125, 0.0])
    report = compare(beyond, expected, tol)
    assert not report["passed"]
    assert (report["mismatched_elements"], report["elements"]) == (1, 4)
    assert report["mismatched_per_million"] == 250_000


def test_mismatched_elements_per_million_allows_exactly_that_many():
    expected = np.zeros(20_000, np.float32)  # 100 per million of 20000 elements: 2 allowed
    tol = _tol(atol=1e-3, ppm=100)
    two, three = expected.copy(), expected.copy()
    two[[5, 17]] = 1.0
    three[[5, 17, 99]] = 1.0
    assert compare(two, expected, tol)["passed"]
    report = compare(three, expected, tol)
    assert not report["passed"] and report["mismatched_elements"] == 3
    assert report["mismatched_per_million"] == pytest.approx(150.0)
    assert report["max_abs_error"] == 1.0
    assert compare(np.zeros(3), np.zeros(3), _tol())["passed"], "zero tolerance, exact output"


def test_nan_or_a_wrong_shape_fails_and_equal_nans_match():
    tol = _tol(atol=1.0, ppm=1e6 - 1)
    report = compare(np.full(4, np.nan), np.zeros(4), tol)
    assert not report["passed"] and report["mismatched_elements"] == 4
    assert report["max_abs_error"] == np.inf
    assert compare(np.array([np.nan, np.inf]), np.array([np.nan, np.inf]), _tol())["passed"]
    report = compare(np.zeros((1, 2)), np.zeros((1, 3)), tol)
    assert not report["passed"] and "shape (1, 2) != expected (1, 3)" in report["error"]
    assert "no such output" in compare(None, np.zeros(3), tol)["error"]


def test_integer_outputs_are_compared_exactly_in_float64():
    big = np.array([2**40, 7], np.int64)
    assert compare(big, big, _tol())["passed"]
    assert not compare(big + 1, big, _tol())["passed"]


# ------------------------------------------------------------------------- which entry applies
def test_no_declared_tolerance_uses_the_spec_defaults():
    pkg = load_package(UNET)
    default = v0_5.ReproducibilityTolerance()
    for wf in ("onnx", "torchscript"):
        tol = tolerance_for(pkg, "probability", wf)
        assert (
            tol.relative_tolerance,
            tol.absolute_tolerance,
            tol.mismatched_elements_per_million,
        ) == (
            default.relative_tolerance,
            default.absolute_tolerance,
            default.mismatched_elements_per_million,
        )
        assert tol.source == "bioimageio.spec default"


ENTRIES = (
    {"output_ids": ["other"], "relative_tolerance": 0.008},
    {"weights_formats": ["torchscript"], "output_ids": ["probability"], "absolute_tolerance": 5e-3},
    {"weights_formats": ["onnx"], "relative_tolerance": 1e-4, "absolute_tolerance": 1e-4,
     "mismatched_elements_per_million": 0},
    {"relative_tolerance": 2e-3, "absolute_tolerance": 2e-3, "mismatched_elements_per_million": 7},
)  # fmt: skip


def test_the_first_entry_for_the_output_and_weight_format_wins(tmp_path):
    pkg = load_package(_variant(tmp_path, _declare(*ENTRIES)))
    onnx = tolerance_for(pkg, "probability", "onnx")
    assert (onnx.relative_tolerance, onnx.absolute_tolerance) == (1e-4, 1e-4)
    assert onnx.mismatched_elements_per_million == 0 and "entry 3" in onnx.source
    ts = tolerance_for(pkg, "probability", "torchscript")
    assert ts.absolute_tolerance == 5e-3 and "entry 2" in ts.source
    assert ts.relative_tolerance == v0_5.ReproducibilityTolerance().relative_tolerance
    other = tolerance_for(pkg, "other", "keras_hdf5")
    assert other.relative_tolerance == 0.008 and "entry 1" in other.source
    rest = tolerance_for(pkg, "probability", "keras_hdf5")
    assert rest.mismatched_elements_per_million == 7 and "entry 4" in rest.source


def test_legacy_test_kwargs_apply_to_their_weight_format(tmp_path):
    def edit(rdf: dict) -> None:
        rdf["config"] = {"bioimageio": {"test_kwargs": {"onnx": {"absolute_tolerance": 4e-3}}}}

    pkg = load_package(_variant(tmp_path, edit))
    assert tolerance_for(pkg, "probability", "onnx").absolute_tolerance == 4e-3
    assert tolerance_for(pkg, "probability", "torchscript").source == "bioimageio.spec default"


@pytest.mark.parametrize("declared", [(), ENTRIES], ids=["none", "entries"])
@pytest.mark.parametrize("wf", ["onnx", "torchscript", "keras_hdf5"])
@pytest.mark.parametrize("output", ["probability", "other"])
def test_the_choice_is_bioimageio_cores(tmp_path, declared, wf, output):
    """Whatever `bioimageio test` would use for this output and weight format, we use."""
    from bioimageio.core._resource_tests import _get_tolerance

    pkg = load_package(_variant(tmp_path, _declare(*declared)))
    ours = tolerance_for(pkg, output, wf)
    assert _get_tolerance(pkg.descr, wf, output) == (
        ours.relative_tolerance,
        ours.absolute_tolerance,
        ours.mismatched_elements_per_million,
    )


def test_a_format_04_package_gets_bioimageio_cores_defaults_for_it():
    from bioimageio.core._resource_tests import _get_tolerance

    descr = v0_4.ModelDescr.model_construct()
    tol = tolerance_for(descr, "output0", "onnx")
    assert (tol.relative_tolerance, tol.absolute_tolerance) == (V04_RTOL, V04_ATOL)
    assert tol.mismatched_elements_per_million == V04_MISMATCHED_PER_MILLION
    assert _get_tolerance(descr, "onnx", "output0") == (V04_RTOL, V04_ATOL, 0)


def test_judge_names_each_output_and_the_figures(tmp_path):
    folder = _perturbed(tmp_path, 100, 0.05, {"absolute_tolerance": 1e-3, "relative_tolerance": 0,
                                              "mismatched_elements_per_million": 50})  # fmt: skip
    pkg = load_package(folder)
    expected = {"probability": np.load(folder / "test_output.npy")}
    (name, report), = judge(pkg, {"probability": Y}, expected, "onnx").items()  # fmt: skip
    assert name == "probability" and not report["passed"]
    assert report["mismatched_elements"] == 100
    assert report["max_abs_error"] == pytest.approx(0.05, rel=1e-3)
    line = summary_line(name, report)
    assert line.startswith("output 'probability' FAILED: 100 of 262144 elements mismatched")
    assert "50 allowed" in line and "max abs error 0.05" in line and "entry 1" in line
    ok = judge(load_package(UNET), {"probability": Y}, {"probability": Y}, "onnx")
    assert ok["probability"]["passed"] and ok["probability"]["max_abs_error"] == 0


# ------------------------------------------------------------------------- the command's package
def test_the_package_comes_from_the_zoo_by_the_served_id(tmp_path):
    from bioengine_core.bundled import bundled_path
    from bioengine_core.cli_modeltest import difference, local_package
    from bioengine_core.testing.zoo import bundled_zoo

    with bundled_zoo() as zoo:
        site = tmp_path / "site.toml"
        site.write_text(f'[engine]\nstate_dir = "{tmp_path / "state"}"\n\n{zoo.toml()}')
        # the bundled package that the served one is (the cache normalised the description)
        description = yaml.safe_load(zoo.versions["tiny-affine"][-1].rdf)
        served = {"id": "tiny-affine", "weight_format": "onnx", "description": description}
        assert local_package(None, served, site).root == bundled_path("tiny_affine")
        # a zoo package that is not bundled comes from the zoo, by its id
        published = zoo.publish(
            bundled_path("tiny_affine"), "calm-affine", edit=lambda d: d.update(name="Calm affine")
        )
        description = yaml.safe_load(published.rdf)
        served = {"id": "calm-affine", "weight_format": "onnx", "description": description}
        pkg = local_package(None, served, site)
        assert pkg.root.is_relative_to(tmp_path / "state") and pkg.name == "Calm affine"
        assert pkg.rdf != description, "the cache normalises it (format 0.5.4 -> 0.5.x)"
        other = copy.deepcopy(description)
        other["outputs"][0]["test_tensor"]["sha256"] = "0" * 64
        with pytest.raises(typer.Exit) as info:
            local_package(None, {**served, "description": other}, site)
        assert info.value.exit_code == 2
        assert difference(other, pkg.rdf) == "its test output 'y' is not the served one"
        other = copy.deepcopy(description)
        other["config"] = {"bioimageio": {"reproducibility_tolerance": [{"output_ids": ["y"]}]}}
        assert difference(other, pkg.rdf) == "it declares another reproducibility_tolerance"


def test_usage_and_connection_errors_exit_2_with_one_line():
    unreachable = f"http://127.0.0.1:{free_port()}"
    result = run_cli("test", "unet2d_nuclei_broad", "--url", unreachable)
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: cannot reach {unreachable}: [Errno 111] Connection refused"
    )
    helped = run_cli("test", "--help")
    assert helped.returncode == 0
    assert "bioengine test unet2d_nuclei_broad --url http://127.0.0.1:9000" in helped.stdout
    assert "reproducibility_tolerance" in helped.stdout


# ------------------------------------------------------------------------- with a real Triton
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`bioengine serve` with the bundled model and a variant whose test output is perturbed
    beyond its declared tolerance (100 elements off by 0.05; 50 per million allowed)."""
    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    tmp = tmp_path_factory.mktemp("tolerance")
    entry = {"absolute_tolerance": 1e-3, "relative_tolerance": 0,
             "mismatched_elements_per_million": 50, "output_ids": ["probability"]}  # fmt: skip
    variant = _perturbed(tmp, 100, 0.05, entry)
    port = free_port()
    cfg = local_config(tmp, port=port, extra_model=f'\n[[models]]\nsource = "folder:{variant}"\n')
    serve = Serve(cfg)
    try:
        serve.wait_serving()
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: get_status(url)["ready_replicas"] == 1, 180, "a ready replica")
        yield url, variant
    finally:
        serve.stop()
        print(serve.output)


@pytest.mark.triton
def test_bioengine_test_passes_for_the_bundled_model(served):
    url, _ = served
    result = run_cli("test", "unet2d_nuclei_broad", "--url", url)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "unet2d_nuclei_broad: passed" in result.stdout
    assert "probability" in result.stdout and "bioimageio.spec default" in result.stdout
    assert "(onnx weights)" in result.stdout
    as_json = run_cli("test", "unet2d_nuclei_broad", "--url", url, "--json")
    report = __import__("json").loads(as_json.stdout)
    out = report["outputs"]["probability"]
    assert report["passed"] and out["mismatched_elements"] == 0 and out["max_abs_error"] < 1e-4


@pytest.mark.triton
def test_bioengine_test_fails_beyond_the_declared_tolerance_naming_output_and_figures(served):
    url, variant = served
    result = run_cli("test", "unet_perturbed", "--url", url, "--package", str(variant))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "unet_perturbed: FAILED" in result.stdout
    line = next(x for x in result.stderr.splitlines() if x.startswith("output 'probability'"))
    assert "FAILED: 100 of 262144 elements mismatched (381.5 per million, 50 allowed)" in line
    assert "max abs error 0.05" in line and "atol 0.001" in line and "entry 1" in line
    # without --package there is no local copy of a folder-served package: say what to pass
    missing = run_cli("test", "unet_perturbed", "--url", url)
    assert missing.returncode == 2 and "pass --package" in missing.stderr
    unknown = run_cli("test", "no_such_model", "--url", url)
    assert unknown.returncode == 2
    assert "answered 404 for model 'no_such_model': unknown model" in unknown.stderr
