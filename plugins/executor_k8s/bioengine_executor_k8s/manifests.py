"""Render the Kubernetes objects of one deployment: Deployment, Service, Secret, one-off Pod.

Pure functions from settings and a ReplicaSpec to plain dicts (what `kubectl apply -f` reads),
so that `preview()` shows exactly what the executor sends to the API server.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

import yaml

from bioengine_core.contracts import ReplicaSpec
from bioengine_core.errors import ExecutorError
from bioengine_core.util import DEPLOYMENT_LABEL

from .settings import K8sSettings

# Every object and pod carries the engine's deployment name under DEPLOYMENT_LABEL (the core's).
REPLICA_KIND_LABEL = "bioengine.replica-kind"
"""`deployment` for pods of the Deployment, `standalone` for one-off pods from `start()`."""
MANAGED_BY = ("app.kubernetes.io/managed-by", "bioengine")
LAST_APPLIED = "bioengine.io/last-applied"
"""Annotation holding what the executor last applied (for three-way updates, as kubectl does)."""
CONTAINER = "triton"
REDACTED = "<redacted>"

_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_REMOTE = ("s3://", "gs://", "as://")


@dataclass(frozen=True)
class Names:
    """Names of the objects that belong to one deployment."""

    base: str
    """The Deployment's and the Service's name."""
    secret: str
    """The Secret with the storage's credentials (when the executor manages one)."""


def names_for(settings: K8sSettings, deployment: str) -> Names:
    """PREFIX-DEPLOYMENT as a DNS label short enough for pod names derived from it."""
    if not deployment or len(deployment) > 63 or not _LABEL_VALUE.fullmatch(deployment):
        raise ExecutorError(
            f"deployment name {deployment!r} cannot be a Kubernetes label value: use at most 63 "
            "letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        )
    slug = re.sub(r"[^a-z0-9-]+", "-", deployment.lower()).strip("-") or "x"
    base = f"{settings.name_prefix}-{slug}"
    if len(base) > 47 or slug != deployment:
        # keep names unique when lower-casing or shortening could make two deployments collide
        digest = hashlib.sha256(deployment.encode()).hexdigest()[:6]
        base = f"{base[:40].rstrip('-')}-{digest}"
    return Names(base=base, secret=f"{base}-env")


def common_labels(settings: K8sSettings, spec: ReplicaSpec) -> dict[str, str]:
    """Labels on every object of the deployment (recommended app.kubernetes.io set + ours)."""
    names = names_for(settings, spec.deployment)
    labels = {
        "app.kubernetes.io/name": "tritonserver",
        "app.kubernetes.io/instance": names.base,
        "app.kubernetes.io/component": "inference-server",
        MANAGED_BY[0]: MANAGED_BY[1],
    }
    labels.update(settings.labels)
    labels.update(spec.labels)
    labels[DEPLOYMENT_LABEL] = spec.deployment
    return labels


def selector_labels(settings: K8sSettings, spec: ReplicaSpec) -> dict[str, str]:
    """The Deployment's (immutable) pod selector; one-off pods never match it."""
    return {
        "app.kubernetes.io/instance": names_for(settings, spec.deployment).base,
        DEPLOYMENT_LABEL: spec.deployment,
        REPLICA_KIND_LABEL: "deployment",
    }


def uses_managed_secret(settings: K8sSettings, spec: ReplicaSpec) -> bool:
    """True when the storage's environment goes into a Secret this executor writes."""
    return bool(spec.env) and not settings.repository_secret


def repository_uri(settings: K8sSettings, spec: ReplicaSpec) -> str:
    """What Triton gets as `--model-repository`; ExecutorError when pods could not read it."""
    if settings.repository_uri:
        return settings.repository_uri
    if settings.repository_pvc or settings.repository_host_path:
        root = settings.repository_mount_path.rstrip("/") or "/"
        return root
    uri = spec.repository.uri
    if uri.startswith(_REMOTE):
        return uri
    raise ExecutorError(
        f"the model repository {uri!r} is a directory on the engine's host, which pods cannot "
        "read: set [executor] repository_pvc (a volume the storage also writes to), "
        "repository_host_path, or use an S3 storage (and repository_uri if pods reach S3 at "
        "another address)"
    )


def triton_args(settings: K8sSettings, spec: ReplicaSpec) -> list[str]:
    """tritonserver arguments: repository, ports, explicit model control, the spec's models."""
    args = [
        f"--model-repository={repository_uri(settings, spec)}",
        f"--http-port={settings.http_port}",
        f"--grpc-port={settings.grpc_port}",
        f"--metrics-port={settings.metrics_port}",
        "--model-control-mode=explicit",
        "--exit-on-error=false",
        "--log-info=true",
    ]
    args += [f"--load-model={name}" for name in spec.models]
    return args + list(settings.triton_args)


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": "http"},
        "periodSeconds": period,
        "timeoutSeconds": 3,
        "failureThreshold": failures,
    }


def _ports(settings: K8sSettings) -> list[tuple[str, int]]:
    """Triton's named ports: HTTP, gRPC, metrics (the container's and the Service's)."""
    return [
        ("http", settings.http_port),
        ("grpc", settings.grpc_port),
        ("metrics", settings.metrics_port),
    ]


def _resources(settings: K8sSettings, gpus: int) -> dict[str, Any]:
    """The container's requests and limits (GPUs as a limit on `gpu_resource`)."""
    requests = {
        k: v
        for k, v in (("cpu", settings.cpu_request), ("memory", settings.memory_request))
        if v is not None
    }
    limits: dict[str, Any] = {
        k: v
        for k, v in (("cpu", settings.cpu_limit), ("memory", settings.memory_limit))
        if v is not None
    }
    if gpus:
        limits[settings.gpu_resource] = gpus
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return resources


def _env_from(settings: K8sSettings, spec: ReplicaSpec) -> list[dict[str, Any]]:
    """Secrets whose keys become the container's environment (the repository's credentials)."""
    env_from = [{"secretRef": {"name": name}} for name in settings.env_from_secrets]
    if settings.repository_secret:
        env_from.append({"secretRef": {"name": settings.repository_secret}})
    elif uses_managed_secret(settings, spec):
        env_from.append({"secretRef": {"name": names_for(settings, spec.deployment).secret}})
    return env_from


def _volume_mounts(settings: K8sSettings) -> list[dict[str, Any]]:
    """The repository volume (read-only) and the memory-backed /dev/shm, where configured."""
    mounts = []
    if settings.repository_pvc or settings.repository_host_path:
        mount: dict[str, Any] = {
            "name": "model-repository",
            "mountPath": settings.repository_mount_path,
            "readOnly": True,
        }
        if settings.repository_sub_path:
            mount["subPath"] = settings.repository_sub_path
        mounts.append(mount)
    if settings.shm_size:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return mounts


def container(settings: K8sSettings, spec: ReplicaSpec) -> dict[str, Any]:
    """The Triton container: command, ports, env, resources, probes, mounts."""
    env_from = _env_from(settings, spec)
    resources = _resources(settings, spec.gpus or settings.gpus)
    mounts = _volume_mounts(settings)
    startup_failures = max(1, math.ceil(settings.startup_timeout / settings.probe_period))
    out: dict[str, Any] = {
        "name": CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": list(settings.command),
        "args": triton_args(settings, spec),
        "ports": [
            {"name": name, "containerPort": port, "protocol": "TCP"}
            for name, port in _ports(settings)
        ],
    }
    if settings.env:
        out["env"] = [{"name": k, "value": v} for k, v in sorted(settings.env.items())]
    if env_from:
        out["envFrom"] = env_from
    if resources:
        out["resources"] = resources
    out["startupProbe"] = _probe("/v2/health/live", settings.probe_period, startup_failures)
    out["readinessProbe"] = _probe("/v2/health/ready", settings.probe_period, 3)
    out["livenessProbe"] = _probe(
        "/v2/health/live", settings.probe_period, settings.liveness_failures
    )
    if mounts:
        out["volumeMounts"] = mounts
    return out


def _volumes(settings: K8sSettings) -> list[dict[str, Any]]:
    """The pod's volumes: the repository (PVC or host path) and /dev/shm in memory."""
    volumes: list[dict[str, Any]] = []
    if settings.repository_pvc:
        volumes.append(
            {
                "name": "model-repository",
                "persistentVolumeClaim": {"claimName": settings.repository_pvc, "readOnly": True},
            }
        )
    elif settings.repository_host_path:
        volumes.append(
            {
                "name": "model-repository",
                "hostPath": {"path": settings.repository_host_path, "type": "Directory"},
            }
        )
    if settings.shm_size:
        volumes.append(
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": settings.shm_size}}
        )
    return volumes


def _tolerations(settings: K8sSettings) -> list[dict[str, Any]]:
    """The settings' tolerations with Kubernetes' field names."""
    return [
        {
            {"toleration_seconds": "tolerationSeconds"}.get(k, k): v
            for k, v in t.model_dump(exclude_none=True).items()
        }
        for t in settings.tolerations
    ]


def pod_spec(settings: K8sSettings, spec: ReplicaSpec) -> dict[str, Any]:
    """The pod spec shared by the Deployment's template and one-off pods."""
    out: dict[str, Any] = {"containers": [container(settings, spec)]}
    volumes = _volumes(settings)
    if volumes:
        out["volumes"] = volumes
    if settings.node_selector:
        out["nodeSelector"] = dict(sorted(settings.node_selector.items()))
    if settings.tolerations:
        out["tolerations"] = _tolerations(settings)
    if settings.image_pull_secrets:
        out["imagePullSecrets"] = [{"name": n} for n in settings.image_pull_secrets]
    if settings.service_account:
        out["serviceAccountName"] = settings.service_account
    if settings.runtime_class:
        out["runtimeClassName"] = settings.runtime_class
    if settings.priority_class:
        out["priorityClassName"] = settings.priority_class
    out["terminationGracePeriodSeconds"] = settings.termination_grace
    return out


def _metadata(
    settings: K8sSettings, name: str, labels: dict[str, str], annotations: dict[str, str]
) -> dict[str, Any]:
    """An object's metadata in the settings' namespace (annotations only when there are any)."""
    meta: dict[str, Any] = {"name": name, "namespace": settings.namespace, "labels": labels}
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def render_deployment(settings: K8sSettings, spec: ReplicaSpec, replicas: int) -> dict[str, Any]:
    """The Deployment running `replicas` Triton pods; rolling updates never drop below target."""
    names = names_for(settings, spec.deployment)
    labels = common_labels(settings, spec)
    selector = selector_labels(settings, spec)
    template_meta: dict[str, Any] = {"labels": {**labels, **selector}}
    if settings.annotations:
        template_meta["annotations"] = dict(settings.annotations)
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(settings, names.base, labels, settings.annotations),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
            },
            "revisionHistoryLimit": 3,
            "template": {"metadata": template_meta, "spec": pod_spec(settings, spec)},
        },
    }


def render_service(settings: K8sSettings, spec: ReplicaSpec) -> dict[str, Any]:
    """The Service in front of every pod of the deployment (HTTP, gRPC, metrics)."""
    names = names_for(settings, spec.deployment)
    labels = common_labels(settings, spec)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(settings, names.base, labels, settings.service_annotations),
        "spec": {
            "type": settings.service_type,
            "selector": {
                "app.kubernetes.io/instance": names.base,
                DEPLOYMENT_LABEL: spec.deployment,
            },
            "ports": [
                {"name": name, "port": port, "targetPort": name, "protocol": "TCP"}
                for name, port in _ports(settings)
            ],
        },
    }


def render_secret(
    settings: K8sSettings, spec: ReplicaSpec, *, redact: bool = True
) -> dict[str, Any] | None:
    """The Secret with the storage's environment (credentials); None when none is needed."""
    if not uses_managed_secret(settings, spec):
        return None
    names = names_for(settings, spec.deployment)
    data = {k: (REDACTED if redact else v) for k, v in sorted(spec.env.items())}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(settings, names.secret, common_labels(settings, spec), {}),
        "type": "Opaque",
        "stringData": data,
    }


def render_pod(settings: K8sSettings, spec: ReplicaSpec, name: str) -> dict[str, Any]:
    """A one-off pod (from `start()`): same container, not owned by the Deployment."""
    labels = {**common_labels(settings, spec), REPLICA_KIND_LABEL: "standalone"}
    body = pod_spec(settings, spec)
    body["restartPolicy"] = "Always"
    meta = _metadata(settings, name, labels, settings.annotations)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": body}


def render_all(settings: K8sSettings, spec: ReplicaSpec, replicas: int = 1) -> list[dict[str, Any]]:
    """Secret (values redacted), Deployment and Service, in the order they are applied."""
    secret = render_secret(settings, spec, redact=True)
    docs = [secret] if secret else []
    return docs + [render_deployment(settings, spec, replicas), render_service(settings, spec)]


def to_yaml(docs: list[dict[str, Any]]) -> str:
    """Objects as one multi-document YAML text (the `kubectl apply -f` format)."""
    return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False, width=100)


def merge_patch(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) turning `old` into `new`; None: nothing to change."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return None if old == new else new
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            sub = merge_patch(old[key], value) if isinstance(value, dict) else value
            if isinstance(value, dict) and not isinstance(old[key], dict):
                sub = value
            if sub is not None or value is None:
                patch[key] = sub
    return patch or None
