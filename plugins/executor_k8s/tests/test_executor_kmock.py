"""The k8s executor against kmock, an in-memory Kubernetes API served over real HTTP.

What this proves: the objects the executor creates, patches and deletes (through the official
client and a kubeconfig file), the scale subresource, adoption of an existing Deployment by a
restarted engine, and how pod objects map onto replica states. What it cannot prove: kmock runs
no controllers or kubelet, so no pod ever appears by itself; tests write pod objects (with
Ready conditions) the way the kubelet would. The real behaviour is covered by
test_real_cluster.py when a cluster is available.
"""

from __future__ import annotations

import dataclasses
import json
import socket
from pathlib import Path
from typing import Any

import pytest
from bioengine_executor_k8s import K8sExecutor
from bioengine_executor_k8s import manifests as m

from bioengine_core.contracts import BackendContext, ReplicaSpec, ReplicaState, RepositoryLocation
from bioengine_core.errors import ExecutorError

NAMESPACE = "bioengine-test"  # the namespace of conftest's kubeconfig and settings
EmulatedApi = Any  # conftest.EmulatedApi (pytest imports conftest by path, not by name)


def write_pod(
    executor: K8sExecutor,
    spec: ReplicaSpec,
    name: str,
    *,
    ready: bool = True,
    phase: str = "Running",
    ip: str | None = "10.1.2.3",
    kind: str = "deployment",
    status: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
) -> None:
    """Create a pod of the Deployment as the ReplicaSet and kubelet would leave it."""
    template = m.render_deployment(executor.settings, spec, 1)["spec"]["template"]
    pod_labels = {**template["metadata"]["labels"], m.REPLICA_KIND_LABEL: kind, **(labels or {})}
    st: dict[str, Any] = status or {
        "phase": phase,
        "podIP": ip,
        "startTime": "2026-01-01T00:00:00Z",
        "conditions": [
            {"type": "PodScheduled", "status": "True"},
            {"type": "Ready", "status": "True" if ready else "False"},
        ],
        "containerStatuses": [
            {
                "name": "triton",
                "ready": ready,
                "restartCount": 0,
                "image": executor.settings.image,
                "imageID": "",
                "state": {"running": {"startedAt": "2026-01-01T00:00:01Z"}},
            }
        ],
    }
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE, "labels": pod_labels},
        "spec": {**template["spec"], "nodeName": "gpu-node-1"},
        "status": st,
    }
    executor.core.create_namespaced_pod(NAMESPACE, body)


def mutating(api: EmulatedApi, since: int, name: str) -> list[tuple[str, str]]:
    """POST/PATCH/PUT/DELETE requests about objects named `name` after request number `since`."""
    return [
        (meth, path)
        for meth, path in api.requests()[since:]
        if meth in ("POST", "PATCH", "PUT", "DELETE") and name in path
    ]


# ------------------------------------------------------------------ scale: create, patch, adopt


def test_scale_creates_deployment_and_service_with_the_rendered_spec(
    api: EmulatedApi, executor: K8sExecutor, spec: ReplicaSpec
) -> None:
    """First scale(): a Deployment with N replicas and a Service, exactly as previewed."""
    executor.scale(spec, 2)
    name = m.names_for(executor.settings, spec.deployment).base
    dep = api.get("deployments", name)
    svc = api.get("services", name)
    assert dep is not None and svc is not None
    assert dep["spec"]["replicas"] == 2
    rendered = m.render_deployment(executor.settings, spec, 2)
    assert dep["spec"]["template"] == rendered["spec"]["template"]
    assert dep["spec"]["selector"] == rendered["spec"]["selector"]
    assert dep["metadata"]["labels"]["bioengine.deployment"] == spec.deployment
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert svc["spec"] == m.render_service(executor.settings, spec)["spec"]
    assert api.get("secrets", f"{name}-env") is None, "no credentials, no Secret"
    # what was applied is recorded for the next three-way update
    applied = json.loads(dep["metadata"]["annotations"][m.LAST_APPLIED])
    assert "replicas" not in applied["spec"]


def test_scale_changes_replicas_through_the_scale_subresource(
    api: EmulatedApi, executor: K8sExecutor, spec: ReplicaSpec
) -> None:
    """Later scale() calls patch /scale only; the template is untouched (no rolling restart)."""
    executor.scale(spec, 1)
    name = m.names_for(executor.settings, spec.deployment).base
    since = len(api.requests())
    executor.scale(spec, 3)
    assert api.get("deployments", name)["spec"]["replicas"] == 3
    assert mutating(api, since, name) == [
        ("PATCH", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{name}/scale")
    ]
    executor.scale(spec, 0)
    assert api.get("deployments", name)["spec"]["replicas"] == 0
    assert api.get("services", name) is not None, "scaling to zero keeps the Service"


def test_restarted_engine_adopts_the_deployment_without_changes(
    api: EmulatedApi, settings_for: Any, context: BackendContext, spec: ReplicaSpec
) -> None:
    """A new executor (restarted engine) with the same config sends no writes at all."""
    first = K8sExecutor(settings_for(), context)
    first.scale(spec, 2)
    first.close()
    name = m.names_for(first.settings, spec.deployment).base
    versions = api.versions("deployments", name)
    since = len(api.requests())
    again = K8sExecutor(settings_for(), context)
    again.scale(spec, 2)
    again.close()
    assert mutating(api, since, name) == []
    assert api.versions("deployments", name) == versions


def test_changed_spec_patches_the_template_and_drops_removed_settings(
    api: EmulatedApi, settings_for: Any, context: BackendContext, spec: ReplicaSpec
) -> None:
    """New models or settings update the Deployment in place; keys no longer set are removed."""
    old = K8sExecutor(settings_for(node_selector={"gpu": "a100"}), context)
    old.scale(spec, 2)
    name = m.names_for(old.settings, spec.deployment).base
    new_spec = dataclasses.replace(spec, models=["unet2d"])
    new = K8sExecutor(settings_for(image="example.org/triton:1"), context)
    since = len(api.requests())
    new.scale(new_spec, 2)
    dep = api.get("deployments", name)
    pod = dep["spec"]["template"]["spec"]
    assert "nodeSelector" not in pod, "a removed setting must disappear from the Deployment"
    assert pod["containers"][0]["image"] == "example.org/triton:1"
    assert "--load-model=affable-shark" not in pod["containers"][0]["args"]
    assert dep["spec"]["replicas"] == 2
    assert mutating(api, since, name) == [
        ("PATCH", f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{name}")
    ]


def test_storage_credentials_go_into_a_managed_secret(
    api: EmulatedApi, settings_for: Any, context: BackendContext, deployment: str
) -> None:
    """An S3 repository's credentials are applied as a Secret the pods read via envFrom."""
    ex = K8sExecutor(settings_for(repository_pvc=None), context)
    spec = ReplicaSpec(
        deployment=deployment,
        repository=RepositoryLocation(
            uri="s3://s3.example.org/bucket/repo", env={"AWS_SECRET_ACCESS_KEY": "s3cr3t"}
        ),
        env={"AWS_SECRET_ACCESS_KEY": "s3cr3t"},
        labels={"bioengine.deployment": deployment},
    )
    assert "s3cr3t" not in ex.preview(spec)
    ex.scale(spec, 1)
    names = m.names_for(ex.settings, deployment)
    secret = api.get("secrets", names.secret)
    assert secret is not None and secret["stringData"] == {"AWS_SECRET_ACCESS_KEY": "s3cr3t"}
    c = api.get("deployments", names.base)["spec"]["template"]["spec"]["containers"][0]
    assert {"secretRef": {"name": names.secret}} in c["envFrom"]
    assert "--model-repository=s3://s3.example.org/bucket/repo" in c["args"]
    assert "s3cr3t" not in json.dumps(c)


def test_rotated_credentials_update_the_secret_without_exposing_them(
    api: EmulatedApi, settings_for: Any, context: BackendContext, deployment: str
) -> None:
    """New credentials patch only the Secret (values sent, digests recorded); a key the storage
    no longer passes is removed; nothing else is rewritten."""
    ex = K8sExecutor(settings_for(repository_pvc=None), context)

    def spec_with(env: dict[str, str]) -> ReplicaSpec:
        return ReplicaSpec(
            deployment=deployment,
            repository=RepositoryLocation(uri="s3://s3.example.org/bucket/repo", env=env),
            env=env,
        )

    ex.scale(spec_with({"AWS_SECRET_ACCESS_KEY": "old-secret", "AWS_SESSION_TOKEN": "tok"}), 1)
    names = m.names_for(ex.settings, deployment)
    assert "old-secret" not in json.dumps(api.get("secrets", names.secret)["metadata"])
    since = len(api.requests())
    ex.scale(spec_with({"AWS_SECRET_ACCESS_KEY": "new-secret"}), 1)
    patches = [
        r
        for r in list(api.emulator)[since:]
        if str(r.method.value) == "PATCH" and names.base in str(r.url.path)
    ]
    assert [str(r.url.path).rsplit("/", 2)[-2:] for r in patches] == [["secrets", names.secret]]
    body = patches[0].data
    assert body["stringData"] == {"AWS_SECRET_ACCESS_KEY": "new-secret"}
    assert body["data"] == {"AWS_SESSION_TOKEN": None}
    recorded = body["metadata"]["annotations"][m.LAST_APPLIED]
    assert "new-secret" not in recorded and "sha256:" in recorded
    ex.close()


def test_refuses_to_take_over_a_foreign_deployment(
    executor: K8sExecutor, spec: ReplicaSpec
) -> None:
    """A Deployment of the same name that BioEngine did not create is left alone."""
    name = m.names_for(executor.settings, spec.deployment).base
    foreign = m.render_deployment(executor.settings, spec, 1)
    del foreign["metadata"]["labels"][m.MANAGED_BY[0]]
    executor.apps.create_namespaced_deployment(NAMESPACE, foreign)
    with pytest.raises(ExecutorError, match=f"Deployment {NAMESPACE}/{name} exists but was not"):
        executor.scale(spec, 2)


def test_delete_removes_every_object(
    api: EmulatedApi, executor: K8sExecutor, spec: ReplicaSpec
) -> None:
    """delete(deployment) removes the Deployment, Service and one-off pods; twice is fine."""
    executor.scale(spec, 1)
    one_off = executor.start(spec).replica_id
    executor.delete(spec.deployment)
    name = m.names_for(executor.settings, spec.deployment).base
    assert api.get("deployments", name) is None and api.get("services", name) is None
    assert api.get("pods", one_off) is None
    executor.delete(spec.deployment)


# ------------------------------------------------------------------ list / status


def test_list_reports_pods_as_replicas(
    executor: K8sExecutor, spec: ReplicaSpec, deployment: str
) -> None:
    """READY pods route to podIP:8000; not-ready, pending, deleted, failed and foreign pods are
    reported (or left out) as the engine needs them."""
    executor.scale(spec, 4)
    base = m.names_for(executor.settings, deployment).base
    write_pod(executor, spec, f"{base}-aaa", ready=True, ip="10.1.2.3")
    write_pod(executor, spec, f"{base}-bbb", ready=False, ip="10.1.2.4")
    write_pod(
        executor,
        spec,
        f"{base}-ccc",
        status={
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                }
            ],
        },
    )
    write_pod(
        executor,
        spec,
        f"{base}-ddd",
        status={"phase": "Failed", "reason": "Evicted", "message": "The node was low on memory."},
    )
    other = dataclasses.replace(spec, deployment=f"{deployment}-other", labels={})
    write_pod(executor, other, f"{base}-other-eee")

    listed = {s.replica_id: s for s in executor.list(deployment)}
    assert sorted(listed) == [f"{base}-aaa", f"{base}-bbb", f"{base}-ccc"]
    ready = listed[f"{base}-aaa"]
    assert ready.state is ReplicaState.READY and ready.url == "http://10.1.2.3:8000"
    assert ready.labels["bioengine.deployment"] == deployment
    assert ready.host == "gpu-node-1" and ready.started_at is not None
    assert listed[f"{base}-bbb"].state is ReplicaState.STARTING
    assert listed[f"{base}-bbb"].url is None, "a replica is routed only when ready"
    pending = listed[f"{base}-ccc"]
    assert (
        pending.state is ReplicaState.PENDING and "Insufficient nvidia.com/gpu" in pending.message
    )
    assert "check [executor] gpus, cpu_request, memory_request" in pending.message
    evicted = executor.status(f"{base}-ddd")
    assert evicted.state is ReplicaState.FAILED and "Evicted" in evicted.message


def test_status_explains_a_stuck_container(executor: K8sExecutor, spec: ReplicaSpec) -> None:
    """An image that cannot be pulled shows the kubelet's reason in the replica's message."""
    executor.scale(spec, 1)
    base = m.names_for(executor.settings, spec.deployment).base
    write_pod(
        executor,
        spec,
        f"{base}-pull",
        status={
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
            "containerStatuses": [
                {
                    "name": "triton",
                    "ready": False,
                    "restartCount": 0,
                    "image": "x",
                    "imageID": "",
                    "state": {
                        "waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling"}
                    },
                }
            ],
        },
    )
    status = executor.status(f"{base}-pull")
    assert status.state is ReplicaState.PENDING
    assert status.message.startswith("ImagePullBackOff")
    assert "(check [executor] image and image_pull_secrets)" in status.message
    assert status.details["stuck"] == "ImagePullBackOff"


def test_status_of_unknown_pod_is_stopped(executor: K8sExecutor) -> None:
    """An id the cluster does not know is STOPPED, and stopping it is a no-op."""
    assert executor.status("bioengine-never-was").state is ReplicaState.STOPPED
    executor.stop("bioengine-never-was")


def test_stop_deletes_the_pod(api: EmulatedApi, executor: K8sExecutor, spec: ReplicaSpec) -> None:
    """stop() deletes the pod (the Deployment replaces it on a real cluster); idempotent."""
    executor.scale(spec, 1)
    base = m.names_for(executor.settings, spec.deployment).base
    write_pod(executor, spec, f"{base}-zzz")
    executor.stop(f"{base}-zzz", grace=3)
    assert api.get("pods", f"{base}-zzz") is None
    assert executor.status(f"{base}-zzz").state is ReplicaState.STOPPED
    assert f"{base}-zzz" not in {s.replica_id for s in executor.list(spec.deployment)}
    executor.stop(f"{base}-zzz", grace=3)
    assert api.get("deployments", base)["spec"]["replicas"] == 1, "stop() does not scale down"


def test_start_creates_a_one_off_pod(
    api: EmulatedApi, executor: K8sExecutor, spec: ReplicaSpec
) -> None:
    """start() creates a standalone pod the Deployment does not own; list() reports it."""
    status = executor.start(spec)
    assert status.state is ReplicaState.PENDING
    pod = api.get("pods", status.replica_id)
    assert pod is not None
    assert pod["metadata"]["labels"][m.REPLICA_KIND_LABEL] == "standalone"
    assert pod["metadata"]["labels"]["bioengine.deployment"] == spec.deployment
    assert pod["spec"]["containers"][0]["args"] == m.triton_args(executor.settings, spec)
    assert status.replica_id in {s.replica_id for s in executor.list(spec.deployment)}
    second = executor.start(spec)
    assert second.replica_id != status.replica_id
    executor.stop(status.replica_id)
    executor.stop(second.replica_id)
    assert executor.status(status.replica_id).state is ReplicaState.STOPPED


def test_logs_are_read_from_the_triton_container(
    api: EmulatedApi, executor: K8sExecutor, spec: ReplicaSpec
) -> None:
    """logs() asks for the `triton` container's last lines."""
    executor.scale(spec, 1)
    base = m.names_for(executor.settings, spec.deployment).base
    write_pod(executor, spec, f"{base}-log")
    since = len(api.requests())
    assert isinstance(executor.logs(f"{base}-log", tail=7), str)
    logged = [r for r in list(api.emulator)[since:] if str(r.url.path).endswith("/log")]
    assert logged and logged[0].params == {"container": "triton", "tailLines": "7"}
    assert "not found" in executor.logs("bioengine-never-was")


# ------------------------------------------------------------------ routing via the Service


def test_route_service_reports_the_service_address(
    settings_for: Any, context: BackendContext, spec: ReplicaSpec
) -> None:
    """route = service: every ready pod reports the Service's address (ClusterIP DNS name,
    NodePort on a node address), so kube-proxy balances."""
    ex = K8sExecutor(settings_for(route="service"), context)
    ex.scale(spec, 1)
    base = m.names_for(ex.settings, spec.deployment).base
    write_pod(ex, spec, f"{base}-svc")
    (status,) = ex.list(spec.deployment)
    assert status.url == f"http://{base}.{NAMESPACE}.svc.cluster.local:8000"

    node = K8sExecutor(
        settings_for(route="service", service_type="NodePort", node_address="10.0.0.9"),
        context,
    )
    node.scale(spec, 1)
    # the API server assigns node ports; kmock does not, so write what it would
    port = {
        "name": "http",
        "port": 8000,
        "targetPort": "http",
        "protocol": "TCP",
        "nodePort": 30800,
    }
    node.core.patch_namespaced_service(
        base, NAMESPACE, {"spec": {"ports": [port]}}, _content_type="application/merge-patch+json"
    )
    (status,) = node.list(spec.deployment)
    assert status.url == "http://10.0.0.9:30800"


# ------------------------------------------------------------------ failures


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_api_server(
    tmp_path: Path, settings_for: Any, context: BackendContext, spec: ReplicaSpec
) -> None:
    """No API server: status() is UNKNOWN, scale() and list() raise ExecutorError saying so."""
    cfg = tmp_path / "dead-kubeconfig"
    cfg.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "c", "cluster": {"server": f"http://127.0.0.1:{_closed_port()}"}}
                ],
                "users": [{"name": "u", "user": {}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "c",
            }
        )
    )
    ex = K8sExecutor(settings_for(kubeconfig=str(cfg), request_timeout=2.0), context)
    ex._api.configuration.retries = 0
    assert ex.status("anything").state is ReplicaState.UNKNOWN
    with pytest.raises(ExecutorError, match="unreachable"):
        ex.scale(spec, 1)
    with pytest.raises(ExecutorError, match="unreachable"):
        ex.list(spec.deployment)


def test_missing_kubeconfig_is_a_clear_error(
    tmp_path: Path, settings_for: Any, context: BackendContext
) -> None:
    """A kubeconfig path that does not exist fails at construction, naming the file."""
    with pytest.raises(ExecutorError, match="nope.yaml"):
        K8sExecutor(settings_for(kubeconfig=str(tmp_path / "nope.yaml")), context)


def test_backends_and_gpus_for_the_repository_builder(
    settings_for: Any, context: BackendContext
) -> None:
    """The repository builder learns the image's backends and the GPU indices inside a pod."""
    ex = K8sExecutor(settings_for(gpus=2, triton_backends=["python", "onnxruntime"]), context)
    assert ex.triton_backends() == ["python", "onnxruntime"]
    assert ex.replica_gpus() == [0, 1]
    assert K8sExecutor(settings_for(), context).replica_gpus() == []
