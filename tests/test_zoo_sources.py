"""Zoo ids, DOIs and https references resolve through the zoo emulator (a real HTTP server in
the zoo's URL layout) into the verified cache; faults the network can cause end in one clear
error and leave nothing half-written; `models pull`, `config check` and `serve` use them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from core_helpers import Serve, free_port, run_cli, triton_available

from bioengine_core.bundled import bundled_path
from bioengine_core.contracts import BackendContext
from bioengine_core.errors import ModelError
from bioengine_core.sources_zoo import ZooSource, ZooSourceSettings
from bioengine_core.testing.pytest_plugin import require_service
from bioengine_core.testing.zoo import ZooEmulator, bundled_zoo

UNET = bundled_path("unet2d_nuclei_broad")
TINY = bundled_path("tiny_affine")


@pytest.fixture(scope="module")
def zoo():
    emulator = bundled_zoo().start()
    yield emulator
    emulator.stop()


@pytest.fixture(autouse=True)
def _no_faults(zoo):
    zoo.clear_faults()
    yield
    zoo.clear_faults()


class Source:
    """A zoo source pointed at the emulator, with its progress lines collected."""

    def __init__(self, zoo: ZooEmulator, tmp: Path, **settings):
        self.lines: list[str] = []
        self.cache_dir = tmp / "sources"
        context = BackendContext(
            deployment="t", state_dir=tmp, config_dir=tmp, progress=self.lines.append
        )
        self.source = ZooSource(ZooSourceSettings(**{**zoo.settings(), **settings}), context)

    def resolve(self, ref: str) -> Path:
        return self.source.resolve(ref, cache_dir=self.cache_dir)

    @property
    def entries(self) -> list[str]:
        """Names under the cache's package folder (temporary ones included)."""
        folder = self.cache_dir / "bioimageio" / "packages"
        return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _served_names(zoo: ZooEmulator, model_id: str, name: str) -> int:
    return sum(1 for r in zoo.requests if f"/{model_id}/" in r and r.split("?")[0].endswith(name))


def test_zoo_id_resolves_to_a_verified_copy_of_the_package(zoo, tmp_path):
    from bioimageio.spec import load_description
    from bioimageio.spec.model.v0_5 import ModelDescr

    src = Source(zoo, tmp_path)
    folder = src.resolve("bioimageio:affable-shark")
    descr = load_description(folder / "rdf.yaml", perform_io_checks=True)
    assert isinstance(descr, ModelDescr), descr.validation_summary.format()
    assert str(descr.id) == "affable-shark" and str(descr.version) == "2"
    for name in ("weights.onnx", "weights.pt", "test_input.npy", "test_output.npy", "cover0.png"):
        assert (folder / name).read_bytes() == (UNET / name).read_bytes(), name
    assert any("downloaded weights.onnx (1.8 MB)" in line for line in src.lines), src.lines
    assert any("sha256 verified" in line for line in src.lines)
    # a second resolve uses the cache: no file is downloaded again
    before = _served_names(zoo, "affable-shark", "weights.onnx")
    assert src.resolve("bioimageio:affable-shark") == folder
    assert _served_names(zoo, "affable-shark", "weights.onnx") == before


def test_zoo_id_with_version_picks_that_version(zoo, tmp_path):
    src = Source(zoo, tmp_path)
    v1 = src.resolve("bioimageio:affable-shark/1")
    v2 = src.resolve("bioimageio:affable-shark/2")
    assert v1 != v2
    assert "version: '1'" in (v1 / "rdf.yaml").read_text()
    assert (v1 / "weights.onnx").read_bytes() == (UNET / "weights.onnx").read_bytes()


def test_doi_and_https_references(zoo, tmp_path):
    src = Source(zoo, tmp_path)
    by_id = src.resolve("bioimageio:tiny-affine")
    assert src.resolve("doi:10.5281/zenodo.1000001") == by_id
    assert src.resolve(zoo.file_url("tiny-affine", "rdf.yaml")) == by_id
    assert src.resolve(zoo.zip_url("tiny-affine")) == by_id
    assert (by_id / "weights.onnx").read_bytes() == (TINY / "weights.onnx").read_bytes()
    # a DOI that only the collection listing knows (affable-shark version 2)
    assert src.resolve("doi:10.5281/zenodo.5764892") == src.resolve("bioimageio:affable-shark/2")
    with pytest.raises(ModelError, match=r"doi:10\.5281/zenodo\.42.*zenodo_api"):
        src.resolve("doi:10.5281/zenodo.42")


def test_tampered_file_rejects_the_package_naming_the_file(zoo, tmp_path):
    zoo.publish(TINY, "tampered-tiny")
    zoo.tamper("tampered-tiny", "weights.onnx")
    src = Source(zoo, tmp_path)
    with pytest.raises(ModelError, match=r"bioimageio:tampered-tiny: file 'weights.onnx' does not"):
        src.resolve("bioimageio:tampered-tiny")
    assert src.entries == [], "nothing of a rejected package stays in the cache"
    zoo.clear_faults()
    folder = src.resolve("bioimageio:tampered-tiny")
    assert (folder / "weights.onnx").read_bytes() == (TINY / "weights.onnx").read_bytes()
    assert [e for e in src.entries if e.startswith(".")] == []


def test_unknown_id_names_the_id_and_where_it_looked(zoo, tmp_path):
    with pytest.raises(ModelError) as info:
        Source(zoo, tmp_path).resolve("bioimageio:no-such-model")
    text = str(info.value)
    assert text.startswith("bioimageio:no-such-model: no such model in the zoo")
    assert zoo.url in text and "collection_http_pattern" in text


def test_dropped_connection_is_retried_then_succeeds(zoo, tmp_path):
    zoo.publish(TINY, "flaky-tiny")
    zoo.drop("flaky-tiny", "weights.onnx", times=4)  # more than one try's 3 attempts
    src = Source(zoo, tmp_path, retries=2)
    folder = src.resolve("bioimageio:flaky-tiny")
    assert (folder / "weights.onnx").read_bytes() == (TINY / "weights.onnx").read_bytes()
    assert _served_names(zoo, "flaky-tiny", "weights.onnx") == 5
    assert sum("weights.onnx" in line and "retrying" in line for line in src.lines) == 1


def test_connection_dropped_every_time_is_a_clear_error(zoo, tmp_path):
    zoo.publish(TINY, "broken-link")
    zoo.drop("broken-link", "weights.onnx", times=10)
    src = Source(zoo, tmp_path, retries=1)
    with pytest.raises(ModelError, match=r"cannot download weights.onnx from .*after 2 tries"):
        src.resolve("bioimageio:broken-link")
    assert src.entries == []


def test_malformed_and_invalid_descriptions_are_clear_errors(zoo, tmp_path):
    zoo.publish_raw("bad-yaml", {"rdf.yaml": b"name: [unclosed\n  type: model: x\n"})
    zoo.publish_raw("not-a-model", {"rdf.yaml": b"type: model\nformat_version: 0.5.4\n"})
    src = Source(zoo, tmp_path)
    with pytest.raises(ModelError, match=r"^bioimageio:bad-yaml: cannot read its description"):
        src.resolve("bioimageio:bad-yaml")
    with pytest.raises(ModelError, match=r"^bioimageio:not-a-model: its description .* not valid"):
        src.resolve("bioimageio:not-a-model")
    assert src.entries == []


def test_slow_server_is_bounded_by_http_timeout(zoo, tmp_path):
    zoo.publish(TINY, "slow-tiny")
    zoo.slow("slow-tiny", "weights.onnx", 3.0)
    src = Source(zoo, tmp_path, http_timeout=0.5)
    with pytest.raises(ModelError, match=r"weights.onnx .*longer than 0.5 s.*http_timeout"):
        src.resolve("bioimageio:slow-tiny")
    assert src.entries == []
    assert _served_names(zoo, "slow-tiny", "weights.onnx") == 3, "one try, no retries of it"


def test_missing_file_names_the_file_and_the_http_status(zoo, tmp_path):
    pub = zoo.publish(TINY, "missing-weights")
    del pub.files["weights.onnx"]
    with pytest.raises(ModelError, match=r"cannot download weights.onnx: .* answers HTTP 404"):
        Source(zoo, tmp_path).resolve("bioimageio:missing-weights")


_RACE = """
import json, sys
from pathlib import Path
from bioengine_core.contracts import BackendContext
from bioengine_core.sources_zoo import ZooSource, ZooSourceSettings
tmp = Path(sys.argv[2])
ctx = BackendContext(deployment="t", state_dir=tmp, config_dir=tmp)
src = ZooSource(ZooSourceSettings(**json.loads(sys.argv[1])), ctx)
print(src.resolve("bioimageio:affable-shark", cache_dir=tmp / "sources"))
"""


def test_two_processes_resolving_one_id_share_one_cache_entry(zoo, tmp_path):
    zoo.publish(UNET, "race-shark")
    zoo.slow("race-shark", "weights.pt", 0.5)  # widen the window in which both could write
    settings = json.dumps(zoo.settings())
    script = _RACE.replace("affable-shark", "race-shark")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, settings, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    paths = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(paths) == 1, paths
    packages = tmp_path / "sources" / "bioimageio" / "packages"
    assert [p.name for p in packages.iterdir()] == [Path(paths.pop()).name]
    assert _served_names(zoo, "race-shark", "weights.pt") == 1, "fetched once, under the lock"


def _site(tmp: Path, zoo: ZooEmulator, models: list[str], **settings) -> Path:
    blocks = [f'[[models]]\nsource = "{m}"\n' for m in models]
    text = f'[engine]\nstate_dir = "{tmp / "state"}"\n\n{zoo.toml(**settings)}\n' + "".join(blocks)
    path = tmp / "site.toml"
    path.write_text(text)
    return path


def test_pull_fills_the_cache_and_offline_mode_serves_from_it(tmp_path):
    with bundled_zoo() as zoo:
        site = _site(tmp_path, zoo, [])
        pulled = run_cli("models", "pull", "tiny-affine", "--config", str(site))
        assert pulled.returncode == 0, pulled.stdout + pulled.stderr
        assert "downloaded weights.onnx" in pulled.stdout and "cached at" in pulled.stdout
        failed = run_cli("models", "pull", "no-such", "tiny-affine", "--config", str(site))
        assert failed.returncode == 1
        errors = failed.stderr.strip().splitlines()
        assert len(errors) == 1 and errors[0].startswith("error: bioimageio:no-such: no such model")
        settings = zoo.settings()
    # the zoo is gone: offline mode answers from the cache, and names what is missing
    ctx = BackendContext(deployment="t", state_dir=tmp_path, config_dir=tmp_path)
    offline = ZooSource(ZooSourceSettings(**settings, offline=True), ctx)
    folder = offline.resolve("bioimageio:tiny-affine", cache_dir=tmp_path / "state" / "sources")
    assert (folder / "weights.onnx").read_bytes() == (TINY / "weights.onnx").read_bytes()
    with pytest.raises(ModelError) as info:
        offline.resolve("bioimageio:affable-shark", cache_dir=tmp_path / "state" / "sources")
    assert "bioimageio:affable-shark is not in the model cache" in str(info.value)
    assert "`bioengine models pull bioimageio:affable-shark`" in str(info.value)
    # not offline, but the zoo cannot be reached: the cached copy serves, and says so
    lines: list[str] = []
    ctx.progress = lines.append
    online = ZooSource(ZooSourceSettings(**settings, http_timeout=2), ctx)
    assert online.resolve("bioimageio:tiny-affine", cache_dir=tmp_path / "state" / "sources") == (
        folder
    )
    assert any("unreachable" in line and "using the cached copy" in line for line in lines)


def test_settings_are_validated_naming_the_key(zoo, tmp_path):
    site = _site(tmp_path, zoo, [], collection_http_pattern="ftp://mirror/{id}", retries=-1)
    checked = run_cli("config", "check", "--config", str(site))
    assert checked.returncode == 2
    assert "[sources.bioimageio] key 'collection_http_pattern'" in checked.stderr
    assert "[sources.bioimageio] key 'retries'" in checked.stderr


def test_zoo_model_in_models_list_passes_config_check_and_serves(tmp_path):
    require_service(triton_available(), "the tritonserver binary (nvidia-pytriton)")
    port = free_port()
    with bundled_zoo() as zoo:
        site = _site(tmp_path, zoo, ["bioimageio:tiny-affine"])
        checked = run_cli("config", "check", "--config", str(site))
        assert checked.returncode == 0, checked.stderr
        pulled = run_cli("models", "pull", "tiny-affine", "--config", str(site))
        assert pulled.returncode == 0, pulled.stderr
    # serve after the zoo is gone, offline, from what `models pull` cached
    text = site.read_text().replace("[sources.bioimageio]", "[sources.bioimageio]\noffline = true")
    text = text.replace("[engine]\n", '[engine]\nname = "zoo-e2e"\nhealth_interval = 0.5\n')
    executor = '[executor]\nkind = "local"\nmode = "process"\n'
    site.write_text(f'{text}\n{executor}\n[gateways.http]\nkind = "http"\nport = {port}\n')
    serve = Serve(site)
    try:
        serve.wait_serving()
        result = run_cli(
            "infer", "--url", f"http://127.0.0.1:{port}", "--model", "tiny-affine",
            "--input", str(TINY / "test_input.npy"), "--output", str(tmp_path / "out.npy"),
        )  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        expected = np.load(TINY / "test_output.npy")
        np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-5)
    finally:
        serve.stop()
