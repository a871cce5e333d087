"""Rendered manifests match reviewed golden files and validate against the Kubernetes schema.

Validation is offline with `kubernetes-validate` (strict mode: unknown fields are errors)
against the Kubernetes 1.30 OpenAPI schema (KUBERNETES_SCHEMA below), the oldest release the
docs name as supported. Regenerate the golden files after a deliberate change with
`BIOENGINE_UPDATE_GOLDEN=1 pytest plugins/executor_k8s/tests/test_manifests.py` and review
the diff.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from bioengine_executor_k8s import K8sSettings
from bioengine_executor_k8s import manifests as m
from pydantic import ValidationError

from bioengine_core.contracts import ReplicaSpec, RepositoryLocation
from bioengine_core.errors import ExecutorError

kubernetes_validate = pytest.importorskip("kubernetes_validate")

KUBERNETES_SCHEMA = "1.30.0"
GOLDEN = Path(__file__).parent / "golden"


def _spec(**kw: Any) -> ReplicaSpec:
    values: dict[str, Any] = {
        "deployment": "lab",
        "repository": RepositoryLocation(uri="/srv/bioengine/models"),
        "models": ["affable-shark", "unet2d"],
        "labels": {"bioengine.deployment": "lab"},
    }
    values.update(kw)
    return ReplicaSpec(**values)


CASES: dict[str, tuple[dict[str, Any], ReplicaSpec]] = {
    # the defaults with the repository on a PVC
    "minimal": ({"repository_pvc": "bioengine-models"}, _spec()),
    # GPU pods reading S3 with the storage's credentials in a managed Secret, behind a LB
    "gpu_s3_loadbalancer": (
        {
            "namespace": "imaging",
            "gpus": 1,
            "cpu_request": "4",
            "cpu_limit": "8",
            "memory_request": "16Gi",
            "memory_limit": "32Gi",
            "shm_size": "4Gi",
            "node_selector": {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB"},
            "tolerations": [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ],
            "image": "nvcr.io/nvidia/tritonserver:24.10-py3",
            "image_pull_secrets": ["ngc"],
            "runtime_class": "nvidia",
            "service_type": "LoadBalancer",
            "service_annotations": {
                "service.beta.kubernetes.io/aws-load-balancer-internal": "true"
            },
            "labels": {"team": "imaging"},
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": "8002"},
            "env": {"TRITON_LOG_VERBOSE": "0"},
            "repository_uri": "s3://minio.storage.svc:9000/models/repo",
        },
        _spec(
            repository=RepositoryLocation(uri="s3://127.0.0.1:9000/models/repo"),
            env={"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t"},
        ),
    ),
    # a shared filesystem on every node, an existing credentials Secret, NodePort
    "hostpath_nodeport": (
        {
            "repository_host_path": "/shared/bioengine",
            "repository_sub_path": "repository",
            "repository_mount_path": "/repo",
            "repository_secret": "repo-credentials",
            "env_from_secrets": ["extra-env"],
            "shm_size": None,
            "cpu_request": None,
            "memory_request": None,
            "service_type": "NodePort",
            "service_account": "bioengine-triton",
            "priority_class": "inference",
            "triton_args": ["--strict-readiness=true"],
            "name_prefix": "triton",
        },
        _spec(models=["unet2d"], env={"IGNORED": "because repository_secret is set"}),
    ),
}


def _render(case: str) -> str:
    settings, spec = CASES[case]
    return m.to_yaml(m.render_all(K8sSettings(kind="k8s", **settings), spec, replicas=2))


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_manifests_match_golden(case: str) -> None:
    """What preview() shows and scale() applies is the reviewed text, byte for byte."""
    text = _render(case)
    path = GOLDEN / f"{case}.yaml"
    if os.environ.get("BIOENGINE_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; set BIOENGINE_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text()


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_manifests_validate_against_schema(case: str) -> None:
    """Every rendered object is valid Kubernetes (strict: no unknown or misspelt fields)."""
    docs = list(yaml.safe_load_all(_render(case)))
    assert [d["kind"] for d in docs][-2:] == ["Deployment", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_SCHEMA, strict=True)


def test_one_off_pod_validates_and_is_not_selected_by_the_deployment() -> None:
    """start()'s pod is valid and outside the Deployment's selector (no ReplicaSet adopts it)."""
    settings = K8sSettings(kind="k8s", repository_pvc="models")
    spec = _spec()
    pod = m.render_pod(settings, spec, "bioengine-lab-xabc123")
    kubernetes_validate.validate(pod, KUBERNETES_SCHEMA, strict=True)
    selector = m.render_deployment(settings, spec, 1)["spec"]["selector"]["matchLabels"]
    labels = pod["metadata"]["labels"]
    assert any(labels.get(k) != v for k, v in selector.items())
    service_selector = m.render_service(settings, spec)["spec"]["selector"]
    assert all(labels.get(k) == v for k, v in service_selector.items()), "Service must reach it"


def test_deployment_essentials() -> None:
    """Probes on /v2/health/ready and /live at port 8000, labels, GPU limit, models loaded."""
    settings = K8sSettings(kind="k8s", repository_pvc="models", gpus=2)
    dep = m.render_deployment(settings, _spec(), 3)
    pod = dep["spec"]["template"]
    c = pod["spec"]["containers"][0]
    assert dep["spec"]["replicas"] == 3
    assert pod["metadata"]["labels"]["bioengine.deployment"] == "lab"
    assert dep["metadata"]["labels"]["bioengine.deployment"] == "lab"
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert {"name": "http", "containerPort": 8000, "protocol": "TCP"} in c["ports"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert "--load-model=affable-shark" in c["args"] and "--load-model=unet2d" in c["args"]
    assert "--model-control-mode=explicit" in c["args"]
    assert "--model-repository=/models" in c["args"]


def test_secret_values_never_in_preview_but_applied() -> None:
    """The preview redacts the storage's credentials; the applied Secret carries them."""
    settings = K8sSettings(kind="k8s")
    spec = _spec(
        repository=RepositoryLocation(uri="s3://s3.example.org/b/p"),
        env={"AWS_SECRET_ACCESS_KEY": "s3cr3t"},
    )
    assert "s3cr3t" not in m.to_yaml(m.render_all(settings, spec))
    applied = m.render_secret(settings, spec, redact=False)
    assert applied is not None and applied["stringData"]["AWS_SECRET_ACCESS_KEY"] == "s3cr3t"


def test_local_repository_without_volume_is_refused() -> None:
    """A repository only on the engine's disk cannot reach pods: say what to configure."""
    with pytest.raises(ExecutorError, match="repository_pvc"):
        m.render_all(K8sSettings(kind="k8s"), _spec())


def test_names_are_dns_labels_and_unique() -> None:
    """Odd deployment names become valid, distinct object names; invalid label values fail."""
    settings = K8sSettings(kind="k8s")
    a = m.names_for(settings, "Lab_A")
    b = m.names_for(settings, "lab-a")
    assert a.base != b.base
    long = m.names_for(settings, "x" * 63)
    for name in (a.base, b.base, long.base):
        assert len(name) <= 47 and name == name.lower()
    with pytest.raises(ExecutorError, match="label value"):
        m.names_for(settings, "has space")


@pytest.mark.parametrize(
    "bad",
    [
        {"namespace": "Bad_NS"},
        {"cpu_request": "lots"},
        {"node_selector": {"gpu": "a" * 64}},
        {"repository_pvc": "a", "repository_host_path": "/b"},
        {"service_type": "Ingress"},
        {"unknown_key": 1},
    ],
)
def test_settings_reject_bad_values(bad: dict[str, Any]) -> None:
    """Bad settings fail validation at config-check time, not at the API server."""
    with pytest.raises(ValidationError):
        K8sSettings(kind="k8s", **bad)


def test_merge_patch_removes_dropped_keys_and_replaces_lists() -> None:
    """The three-way update patch (RFC 7386) removes what we no longer set."""
    old = {"a": {"x": 1, "y": 2}, "l": [1, 2], "k": "v"}
    new = {"a": {"x": 1}, "l": [3], "k": "v", "n": {"z": 0}}
    assert m.merge_patch(old, new) == {"a": {"y": None}, "l": [3], "n": {"z": 0}}
    assert m.merge_patch(new, new) is None


# ------------------------------------------------------------------ the operator guide

DOCS = Path(__file__).parents[3] / "docs" / "kubernetes.md"


def test_every_setting_is_documented() -> None:
    """Each key of [executor] kind = "k8s" appears in docs/kubernetes.md's settings table."""
    text = DOCS.read_text()
    missing = [
        name for name in K8sSettings.model_fields if name != "kind" and f"`{name}`" not in text
    ]
    assert not missing, f"settings missing from {DOCS}: {missing}"


def test_yaml_examples_in_the_guide_are_valid_kubernetes() -> None:
    """The RBAC example in docs/kubernetes.md validates against the schema."""
    text = DOCS.read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    assert blocks, "no yaml example in the guide"
    for block in blocks:
        for doc in yaml.safe_load_all(block):
            kubernetes_validate.validate(doc, KUBERNETES_SCHEMA, strict=True)
