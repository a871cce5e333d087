"""`[executor] kind = "k8s"`: Triton replicas as one Kubernetes Deployment plus a Service."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bioengine_core.contracts import BackendSettings

# Kubernetes resource quantities ("500m", "2", "16Gi", "1.5G", "1e3").
_QUANTITY = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i?|[munk])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")


class Toleration(BaseModel):
    """One pod toleration (the fields of a Kubernetes `Toleration`)."""

    model_config = ConfigDict(extra="forbid")

    key: str | None = Field(None, description="Taint key; empty with operator Exists: all taints.")
    operator: Literal["Equal", "Exists"] = Field("Equal", description="`Equal` or `Exists`.")
    value: str | None = Field(None, description="Taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        None, description="Taint effect to tolerate; empty: all effects."
    )
    toleration_seconds: int | None = Field(
        None, ge=0, description="For NoExecute: how long the pod stays bound after the taint."
    )


class K8sSettings(BackendSettings):
    """`[executor] kind = "k8s"`: the Deployment's pod template, its Service and API access."""

    kind: Literal["k8s"] = "k8s"

    # --- API access
    namespace: str = Field(
        "default", description="Namespace of the Deployment, Service, Secret and pods."
    )
    kubeconfig: str | None = Field(
        None,
        description="Path of a kubeconfig file (relative to the config file). Unset: in-cluster "
        "service-account credentials when running in a pod, else $KUBECONFIG or ~/.kube/config.",
    )
    context: str | None = Field(None, description="kubeconfig context (default: current).")
    in_cluster: bool | None = Field(
        None,
        description="Force (true) or forbid (false) in-cluster credentials; unset: in-cluster "
        "when KUBERNETES_SERVICE_HOST is set and no kubeconfig is given.",
    )
    request_timeout: float = Field(
        15.0, gt=0, description="Seconds one Kubernetes API request may take."
    )

    # --- names and metadata
    name_prefix: str = Field(
        "bioengine",
        description="Objects are named PREFIX-DEPLOYMENT (Deployment, Service, Secret); that "
        "name and the label `bioengine.deployment` are how a restarted engine adopts them.",
    )
    labels: dict[str, str] = Field(
        default_factory=dict, description="Extra labels on every object and pod."
    )
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Extra annotations on the Deployment and its pods."
    )
    service_annotations: dict[str, str] = Field(
        default_factory=dict,
        description="Annotations on the Service (cloud load-balancer options, for example).",
    )

    # --- what runs
    image: str = Field(
        "nvcr.io/nvidia/tritonserver:24.10-py3",
        description="Container image with Triton (NVIDIA's image has the python, onnxruntime, "
        "pytorch and tensorrt backends).",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="When the kubelet pulls the image."
    )
    image_pull_secrets: list[str] = Field(
        default_factory=list,
        description="Names of docker-registry Secrets in the namespace (e.g. for nvcr.io).",
    )
    command: list[str] = Field(
        default_factory=lambda: ["tritonserver"], description="The server command in the image."
    )
    triton_args: list[str] = Field(
        default_factory=list, description="Extra tritonserver arguments (after the built-in ones)."
    )
    triton_backends: list[str] = Field(
        default_factory=lambda: ["python", "onnxruntime", "pytorch"],
        description="Triton backends the image has; the repository builder uses native "
        "backends only when listed.",
    )
    env: dict[str, str] = Field(
        default_factory=dict, description="Extra environment variables of the Triton container."
    )
    env_from_secrets: list[str] = Field(
        default_factory=list,
        description="Names of existing Secrets whose keys all become environment variables.",
    )
    http_port: int = Field(8000, ge=1, le=65535, description="Triton's HTTP port in the pod.")
    grpc_port: int = Field(8001, ge=1, le=65535, description="Triton's gRPC port in the pod.")
    metrics_port: int = Field(8002, ge=1, le=65535, description="Triton's metrics port.")
    service_account: str | None = Field(
        None, description="ServiceAccount of the pods (e.g. one with cloud storage access)."
    )

    # --- resources and placement
    gpus: int = Field(0, ge=0, description="GPUs per pod (a limit on `gpu_resource`); 0: CPU only.")
    gpu_resource: str = Field(
        "nvidia.com/gpu", description="Extended resource name GPUs are requested as."
    )
    cpu_request: str | None = Field("1", description="CPU request per pod (`500m`, `2`).")
    cpu_limit: str | None = Field(None, description="CPU limit per pod; unset: none.")
    memory_request: str | None = Field("2Gi", description="Memory request per pod (`2Gi`).")
    memory_limit: str | None = Field(None, description="Memory limit per pod; unset: none.")
    shm_size: str | None = Field(
        "1Gi",
        description="Size of a memory-backed /dev/shm (Triton's python backend exchanges tensors "
        "through it; the container default of 64 MiB is too small). Unset: no extra volume.",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels a pod must run on (`nodeSelector`)."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Taints the pods tolerate (GPU nodes are often tainted)."
    )
    runtime_class: str | None = Field(
        None, description="RuntimeClass of the pods (e.g. `nvidia` on some GPU clusters)."
    )
    priority_class: str | None = Field(None, description="PriorityClass of the pods.")

    # --- model repository
    repository_pvc: str | None = Field(
        None,
        description="PersistentVolumeClaim holding the model repository (ReadOnlyMany or "
        "ReadWriteMany), mounted read-only at `repository_mount_path`.",
    )
    repository_host_path: str | None = Field(
        None,
        description="A directory on every node holding the model repository (a shared "
        "filesystem mounted on all nodes, or a single-node cluster); instead of a PVC.",
    )
    repository_sub_path: str | None = Field(
        None, description="Sub-directory of the volume that is the repository."
    )
    repository_mount_path: str = Field(
        "/models", description="Where the repository volume is mounted in the pod."
    )
    repository_uri: str | None = Field(
        None,
        description="What Triton gets as `--model-repository`, overriding the storage's address "
        "(e.g. `s3://minio.storage.svc:9000/bucket/models`: the S3 endpoint as pods see it). "
        "Unset: the mount path with a volume, else the storage's URI (which must then be remote: "
        "s3://, gs://, as://).",
    )
    repository_secret: str | None = Field(
        None,
        description="Existing Secret with the repository credentials (AWS_ACCESS_KEY_ID, ...) "
        "for the pods. Unset: the storage's credentials are written to a Secret "
        "PREFIX-DEPLOYMENT-env that the executor manages.",
    )

    # --- health probes
    startup_timeout: int = Field(
        900,
        ge=10,
        description="Seconds a pod may take until Triton is live (image pull excluded) before "
        "the kubelet restarts it (startup probe).",
    )
    probe_period: int = Field(5, ge=1, description="Seconds between readiness/liveness probes.")
    liveness_failures: int = Field(
        6, ge=1, description="Failed liveness probes in a row before the kubelet restarts Triton."
    )
    termination_grace: int = Field(
        30, ge=0, description="Seconds Triton may take to drain after SIGTERM."
    )

    # --- service and routing
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        "ClusterIP", description="Type of the Service in front of the pods."
    )
    route: Literal["pod", "service"] = Field(
        "pod",
        description="How the engine reaches replicas: `pod` (each pod's IP; the engine must run "
        "in the cluster or on a network that routes pod IPs: per-replica health, retries and "
        "draining) or `service` (every replica reports the Service's address; kube-proxy "
        "balances).",
    )
    service_url: str | None = Field(
        None,
        description="Base URL of the Service as the engine reaches it (route = service), e.g. "
        "`http://triton.example.org:30800`. Unset: derived (ClusterIP: cluster DNS name; "
        "NodePort: `node_address` + node port; LoadBalancer: the load balancer's address).",
    )
    node_address: str | None = Field(
        None, description="A node's address for NodePort services (route = service)."
    )
    cluster_domain: str = Field("cluster.local", description="The cluster's DNS domain.")

    @field_validator("namespace")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        if not _DNS_LABEL.fullmatch(value) or len(value) > 63:
            raise ValueError(
                "must be a DNS label: lower-case letters, digits and '-', at most 63 characters"
            )
        return value

    @field_validator("name_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not re.fullmatch(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", value) or len(value) > 30:
            raise ValueError(
                "must start with a lower-case letter, then letters, digits and '-' "
                "(30 characters at most)"
            )
        return value

    @field_validator("cpu_request", "cpu_limit", "memory_request", "memory_limit", "shm_size")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        if value is not None and not _QUANTITY.fullmatch(value):
            raise ValueError("must be a Kubernetes quantity such as 500m, 2, 512Mi or 16Gi")
        return value

    @field_validator("labels", "node_selector")
    @classmethod
    def _label_map(cls, value: dict[str, str]) -> dict[str, str]:
        for key, val in value.items():
            if not _LABEL_KEY.fullmatch(key):
                raise ValueError(f"{key!r} is not a valid label key")
            if len(val) > 63 or not _LABEL_VALUE.fullmatch(val):
                raise ValueError(f"{key}={val!r}: not a valid label value (63 characters at most)")
        return value

    @field_validator("env")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if not _ENV_NAME.fullmatch(key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
        return value

    @model_validator(mode="after")
    def _one_volume(self) -> K8sSettings:
        if self.repository_pvc and self.repository_host_path:
            raise ValueError("set repository_pvc or repository_host_path, not both")
        if len({self.http_port, self.grpc_port, self.metrics_port}) != 3:
            raise ValueError("http_port, grpc_port and metrics_port must differ")
        return self
