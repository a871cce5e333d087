"""`bioengine config check`, `bioengine k8s manifest` and `bioengine k8s delete` as an operator runs them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

EXAMPLE = Path(__file__).parents[1] / "examples" / "k8s.toml"


def bioengine(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the installed `bioengine` command."""
    exe = shutil.which("bioengine") or str(Path(sys.executable).parent / "bioengine")
    return subprocess.run(
        [exe, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def site(tmp_path: Path, executor: str, kubeconfig: Path | None = None) -> Path:
    """A site.toml with the k8s executor section `executor` (TOML lines)."""
    path = tmp_path / "site.toml"
    kube = f'kubeconfig = "{kubeconfig}"\n' if kubeconfig else ""
    path.write_text(
        f"""
[engine]
name = "clitest"
state_dir = "state"

[executor]
kind = "k8s"
{kube}{executor}

[storage]
kind = "local"

[gateways]

[[models]]
id = "unet2d"
source = "folder:/nowhere/unet2d"
"""
    )
    return path


def test_shipped_example_passes_config_check() -> None:
    """examples/k8s.toml (k8s executor + S3 storage) is a valid site config (offline: its
    cluster and bucket are not here)."""
    pytest.importorskip("bioengine_storage_s3", reason="the example uses the S3 storage plugin")
    names = ["S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY"]
    names += ["BIOENGINE_INFERENCE_TOKEN", "BIOENGINE_ADMIN_TOKEN"]
    env = {name: f"value-of-{name.lower()}-for-the-test" for name in names}
    run = bioengine("config", "check", "--offline", "--config", str(EXAMPLE), env=env)
    assert run.returncode == 0, run.stderr + run.stdout
    blank = {n: "" for n in names}
    unset = bioengine("config", "check", "--offline", "--config", str(EXAMPLE), env=blank)
    assert unset.returncode == 2 and all(f"{n} is not set" in unset.stderr for n in names)


def test_manifest_prints_valid_yaml_without_a_cluster(tmp_path: Path) -> None:
    """`bioengine k8s manifest` renders the Deployment and Service offline."""
    cfg = site(tmp_path, 'namespace = "lab"\nrepository_pvc = "models"\ngpus = 1')
    run = bioengine("k8s", "manifest", "--config", str(cfg), "--replicas", "3")
    assert run.returncode == 0, run.stderr
    docs = list(yaml.safe_load_all(run.stdout))
    assert [d["kind"] for d in docs] == ["Deployment", "Service"]
    dep = docs[0]
    assert dep["spec"]["replicas"] == 3 and dep["metadata"]["namespace"] == "lab"
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--load-model=unet2d" in args


def test_manifest_explains_an_unreachable_repository(tmp_path: Path) -> None:
    """A local repository with no volume for the pods: exit 1 and say what to set."""
    run = bioengine("k8s", "manifest", "--config", str(site(tmp_path, "")))
    assert run.returncode == 1
    assert "repository_pvc" in run.stderr


def test_bad_setting_names_section_and_key(tmp_path: Path) -> None:
    """A bad value fails `config check` with exit 2, naming [executor] and the key."""
    run = bioengine("config", "check", "--config", str(site(tmp_path, 'service_type = "Ingress"')))
    assert run.returncode == 2
    assert "executor" in run.stderr + run.stdout and "service_type" in run.stderr + run.stdout


def test_delete_removes_the_objects(
    tmp_path: Path, kubeconfig: Path, api: Any, settings_for: Any
) -> None:
    """`bioengine k8s delete` removes what scale() created, through the kubeconfig."""
    from bioengine_executor_k8s import K8sExecutor
    from bioengine_executor_k8s import manifests as m

    from bioengine_core.contracts import BackendContext, ReplicaSpec, RepositoryLocation

    settings = settings_for()
    ex = K8sExecutor(settings, BackendContext("clitest", tmp_path, tmp_path))
    ex.scale(ReplicaSpec(deployment="clitest", repository=RepositoryLocation(uri="/x")), 1)
    name = m.names_for(settings, "clitest").base
    assert api.get("deployments", name, settings.namespace) is not None
    cfg = site(
        tmp_path, f'namespace = "{settings.namespace}"\nrepository_pvc = "models"', kubeconfig
    )
    run = bioengine("k8s", "delete", "--config", str(cfg))
    assert run.returncode == 0, run.stderr
    assert api.get("deployments", name, settings.namespace) is None
    assert api.get("services", name, settings.namespace) is None
    ex.close()


@pytest.mark.parametrize("command", ["manifest", "delete"])
def test_wrong_executor_kind_is_refused(tmp_path: Path, command: str) -> None:
    """`bioengine k8s` on a config whose executor is not k8s exits 2 and says so."""
    cfg = tmp_path / "local.toml"
    cfg.write_text('[engine]\nname = "x"\n[executor]\nkind = "local"\n[gateways]\n')
    run = bioengine("k8s", command, "--config", str(cfg))
    assert run.returncode == 2 and 'kind = "k8s"' in run.stderr
