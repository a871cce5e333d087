"""`config check` for [executor] kind = "k8s": the kubeconfig loads (offline); the API answers,
the namespace exists and RBAC grants what the executor does (against the kmock emulator, which
answers access reviews from `api.denied`); each problem names the setting or command. Also the
executor's own API errors at run time: one line with the cause and the fix."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from bioengine_executor_k8s import K8sExecutor
from bioengine_executor_k8s.preflight import NEEDED, preflight
from core_helpers import free_port, run_cli

from bioengine_core.errors import ExecutorError

NAMESPACE = "bioengine-test"  # the namespace of the kubeconfig fixture (conftest)


def site(tmp_path: Path, kubeconfig: Path, **extra: str) -> str:
    lines = "".join(f'{k} = "{v}"\n' for k, v in extra.items())
    path = tmp_path / "site.toml"
    path.write_text(
        f'[engine]\nname = "kp"\nstate_dir = "{tmp_path / "state"}"\n\n'
        f'[executor]\nkind = "k8s"\nkubeconfig = "{kubeconfig}"\nrepository_pvc = "models"\n'
        f'namespace = "{NAMESPACE}"\nrequest_timeout = 5\n{lines}'
    )
    return str(path)


def dead_kubeconfig(kubeconfig: Path, tmp_path: Path) -> Path:
    """The same kubeconfig, its server a port where nothing listens."""
    text = kubeconfig.read_text()
    dead = tmp_path / "dead-kubeconfig"
    dead.write_text(text.replace(text.split("server: ")[1].split()[0], f"http://127.0.0.1:{free_port()}"))  # fmt: skip
    return dead


def test_the_emulated_cluster_passes(settings_for, context, kubeconfig, tmp_path):
    assert preflight(settings=settings_for(), context=context, offline=False) == []
    result = run_cli("config", "check", "--config", site(tmp_path, kubeconfig))
    assert result.returncode == 0, result.stderr


def test_a_missing_namespace_is_named_with_the_command(settings_for, context):
    problems = preflight(
        settings=settings_for(namespace="absent-ns"), context=context, offline=False
    )
    assert problems == [
        "namespace 'absent-ns' does not exist: create it (`kubectl create namespace absent-ns`) "
        "or fix [executor] namespace"
    ]


def test_missing_permissions_are_listed_by_verb_and_resource(api, settings_for, context):
    ns = f"rbac-{uuid.uuid4().hex[:6]}"
    api.declare_namespace(ns)
    api.denied |= {(ns, "patch", "deployments/scale"), (ns, "get", "pods/log")}
    problems = preflight(settings=settings_for(namespace=ns), context=context, offline=False)
    assert len(problems) == 1, problems
    assert "may not patch deployments/scale.apps, get pods/log in namespace " + ns in problems[0]
    assert "docs/kubernetes.md has the Role" in problems[0]


def test_secrets_are_asked_for_only_when_the_executor_writes_one(api, settings_for, context):
    ns = f"rbac-{uuid.uuid4().hex[:6]}"
    api.declare_namespace(ns)
    api.denied.add((ns, "create", "secrets"))
    with_pvc = settings_for(namespace=ns)  # repository on a volume: no Secret
    assert preflight(settings=with_pvc, context=context, offline=False) == []
    over_s3 = settings_for(namespace=ns, repository_pvc=None)
    [problem] = preflight(settings=over_s3, context=context, offline=False)
    assert "may not create secrets in namespace" in problem


def test_an_unreadable_kubeconfig_is_named_offline(tmp_path):
    broken = tmp_path / "kubeconfig"
    broken.write_text("clusters: [\n")
    result = run_cli("config", "check", "--offline", "--config", site(tmp_path, broken))
    assert result.returncode == 2
    assert "cannot configure the Kubernetes client" in result.stderr
    assert "fix [executor] kubeconfig / context" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_missing_kubeconfig_and_an_unknown_context_are_named_offline(kubeconfig, tmp_path):
    result = run_cli("config", "check", "--offline", "--config", site(tmp_path, tmp_path / "nope"))
    assert result.returncode == 2
    assert "kubeconfig: no such file" in result.stderr and "[executor] kubeconfig" in result.stderr
    path = site(tmp_path, kubeconfig, context="nope")
    result = run_cli("config", "check", "--offline", "--config", path)
    assert result.returncode == 2
    assert "context 'nope' is not in kubeconfig" in result.stderr
    assert "(it has kmock): fix [executor] context" in result.stderr


def test_no_api_server_names_the_address(kubeconfig, tmp_path):
    path = site(tmp_path, dead_kubeconfig(kubeconfig, tmp_path))
    result = run_cli("config", "check", "--config", path, timeout=60)
    assert result.returncode == 2
    assert "no Kubernetes API answers at http://127.0.0.1:" in result.stderr, result.stderr
    assert "[executor] kubeconfig / context" in result.stderr
    assert "Traceback" not in result.stderr
    assert run_cli("config", "check", "--offline", "--config", path).returncode == 0


def test_every_permission_the_docs_grant_is_checked():
    """The Role in docs/kubernetes.md grants exactly what the preflight asks the API about."""
    import yaml

    docs = (Path(__file__).resolve().parents[3] / "docs" / "kubernetes.md").read_text()
    block = docs.split("apiVersion: rbac.authorization.k8s.io/v1\nkind: Role\n", 1)[1]
    role = yaml.safe_load("kind: Role\n" + block.split("---", 1)[0])
    granted = {
        (verb, group, resource)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    assert set(NEEDED) == granted


# ----------------------------------------------------------------------------- run time


def test_refused_credentials_and_forbidden_verbs_are_one_line_with_the_fix(
    api, settings_for, context, spec
):
    ns = f"err-{uuid.uuid4().hex[:6]}"
    executor = K8sExecutor(settings_for(namespace=ns), context)
    try:
        api.answer(f"get /api/v1/namespaces/{ns}/pods", 401, "Unauthorized")
        with pytest.raises(ExecutorError) as refused:
            executor.list(spec.deployment)
        assert "401 Unauthorized" in str(refused.value)
        assert "renew them" in str(refused.value) and "[executor] kubeconfig" in str(refused.value)
        forbidden = (
            f'services "x" is forbidden: User "system:serviceaccount:{ns}:bioengine" cannot '
            f'get resource "services" in API group "" in the namespace "{ns}"'
        )
        service = f"get /api/v1/namespaces/{ns}/services/bioengine-{spec.deployment}"
        api.answer(service, 403, forbidden)
        with pytest.raises(ExecutorError) as denied:
            executor.scale(spec, 1)
        text = str(denied.value)
        assert "forbidden (403)" in text and 'cannot get resource "services"' in text
        assert "grant that verb" in text and "\n" not in text
    finally:
        executor.close()


def test_a_missing_namespace_at_run_time_names_the_setting(api, settings_for, context, spec):
    ns = f"gone-{uuid.uuid4().hex[:6]}"
    # a cluster answers reads in a missing namespace "not found", and creates as below
    api.answer(f"post /api/v1/namespaces/{ns}/services", 404, f'namespaces "{ns}" not found')
    executor = K8sExecutor(settings_for(namespace=ns), context)
    try:
        with pytest.raises(ExecutorError) as missing:
            executor.scale(spec, 1)
        assert f"namespace {ns} does not exist" in str(missing.value)
        assert f"kubectl create namespace {ns}" in str(missing.value)
        assert "[executor] namespace" in str(missing.value)
    finally:
        executor.close()


def test_an_unreachable_server_at_run_time_names_it(kubeconfig, tmp_path, context, spec):
    from bioengine_executor_k8s import K8sSettings

    dead = dead_kubeconfig(kubeconfig, tmp_path)
    settings = K8sSettings(kind="k8s", kubeconfig=str(dead), request_timeout=3)
    executor = K8sExecutor(settings, context)
    try:
        with pytest.raises(ExecutorError) as unreachable:
            executor.list(spec.deployment)
        text = str(unreachable.value)
        assert "Kubernetes API unreachable at http://127.0.0.1:" in text
        assert "Connection refused" in text and "0x" not in text and "\n" not in text
    finally:
        executor.close()
