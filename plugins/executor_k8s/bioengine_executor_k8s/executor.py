"""The `k8s` executor: Kubernetes keeps the replicas alive; the engine sets how many.

`scale(spec, n)` creates or updates a Deployment (pods running Triton), a Service in front of
them and, when the storage needs credentials, a Secret; then sets the Deployment's replica count
through its scale subresource. `list(deployment)` reports the pods as replicas. A pod's
`replica_id` is its name.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from datetime import datetime
from functools import cached_property
from typing import Any, ClassVar

import urllib3
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.rest import ApiException

from bioengine_core.contracts import (
    BackendContext,
    Executor,
    ReplicaSpec,
    ReplicaState,
    ReplicaStatus,
)
from bioengine_core.errors import ExecutorError
from bioengine_core.util import DEPLOYMENT_LABEL, url_host

from . import manifests as m
from .settings import K8sSettings

MERGE_PATCH = "application/merge-patch+json"
_RAISE: Any = object()
"""`_call(..., if_absent=_RAISE)`: a 404 answer is an error like any other."""

# Container waiting reasons that need an operator (the kubelet keeps retrying them).
_STUCK = {
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "CrashLoopBackOff",
    "RunContainerError",
}
# What the operator changes when a pod is stuck for one of these reasons.
_FIXES = {
    "ErrImagePull": "check [executor] image and image_pull_secrets",
    "ImagePullBackOff": "check [executor] image and image_pull_secrets",
    "InvalidImageName": "fix [executor] image",
    "CreateContainerConfigError": "check that the Secrets named by [executor] "
    "env_from_secrets / repository_secret exist in the namespace",
    "Unschedulable": "check [executor] gpus, cpu_request, memory_request, node_selector and "
    "tolerations against the cluster's nodes",
}


def uses_in_cluster(settings: K8sSettings) -> bool:
    """Whether the client takes the pod's service-account credentials (see `in_cluster`)."""
    if settings.in_cluster is not None:
        return settings.in_cluster
    return settings.kubeconfig is None and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


def credentials_label(settings: K8sSettings) -> str:
    """How error messages name the credentials in use (kubeconfig file and context)."""
    if uses_in_cluster(settings):
        return "the pod's service account"
    where = f"kubeconfig {settings.kubeconfig}" if settings.kubeconfig else "the default kubeconfig"
    return where + (f" (context {settings.context})" if settings.context else "")


def make_api_client(
    settings: K8sSettings, context: BackendContext | None = None, *, retries: int | None = None
) -> k8s.ApiClient:
    """An ApiClient from the settings: in-cluster credentials or a kubeconfig file.

    `retries` limits urllib3's connection retries (preflight uses 0 to answer quickly)."""
    in_cluster = uses_in_cluster(settings)
    cfg = k8s.Configuration()
    try:
        if in_cluster:
            k8s_config.load_incluster_config(client_configuration=cfg)
        else:
            path = None
            if settings.kubeconfig:
                path = str(
                    context.resolve_path(settings.kubeconfig) if context else settings.kubeconfig
                )
            k8s_config.load_kube_config(
                config_file=path, context=settings.context, client_configuration=cfg
            )
    except (k8s_config.ConfigException, OSError, ValueError, TypeError, KeyError) as exc:
        where = "in-cluster credentials" if in_cluster else (settings.kubeconfig or "kubeconfig")
        fix = (
            "run in a pod with a service account or set [executor] kubeconfig"
            if in_cluster
            else "fix [executor] kubeconfig / context"
        )
        raise ExecutorError(
            f"cannot configure the Kubernetes client from {where}: {_one_line(exc)}: {fix}"
        ) from exc
    if retries is not None:
        cfg.retries = retries
    return k8s.ApiClient(cfg)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _reason(exc: BaseException) -> str:
    """The innermost useful reason of a connection failure (urllib3 wraps them twice)."""
    reason = getattr(exc, "reason", None)
    if isinstance(reason, BaseException):
        exc = reason
    text = _one_line(exc)
    # urllib3: "<urllib3.connection.HTTPConnection object at 0x...>: Failed to establish ..."
    if ">: " in text:
        text = text.split(">: ", 1)[1]
    return text or type(exc).__name__


def _is_tls(exc: BaseException) -> bool:
    import ssl

    seen: BaseException | None = exc
    for _ in range(5):
        if seen is None:
            break
        if isinstance(seen, ssl.SSLError | urllib3.exceptions.SSLError):
            return True
        seen = getattr(seen, "reason", None) or seen.__cause__ or seen.__context__
    return False


def _api_error(
    action: str,
    exc: Exception,
    *,
    settings: K8sSettings | None = None,
    server: str | None = None,
) -> ExecutorError:
    """One line naming what failed, why, and which setting or command fixes it."""
    creds = credentials_label(settings) if settings else "the configured credentials"
    if isinstance(exc, ApiException):
        detail = exc.reason or ""
        try:
            detail = json.loads(exc.body or "{}").get("message") or detail
        except (ValueError, AttributeError):
            pass
        detail = _one_line(Exception(detail))
        if exc.status == 401:
            return ExecutorError(
                f"Kubernetes API: {action} refused (401 Unauthorized): the API server does not "
                f"accept the credentials of {creds}: renew them (a new token or certificate) "
                "or fix [executor] kubeconfig / context"
            )
        if exc.status == 403:
            return ExecutorError(
                f"Kubernetes API: {action} forbidden (403): {detail}: grant that verb on that "
                f"resource to the credentials of {creds} (docs/kubernetes.md has the Role the "
                "executor needs)"
            )
        missing_ns = re.search(r'namespaces "([^"]+)" not found', detail)
        if exc.status == 404 and missing_ns:
            ns = missing_ns.group(1)
            return ExecutorError(
                f"Kubernetes API: {action} failed: namespace {ns} does not exist: create it "
                f"(kubectl create namespace {ns}) or fix [executor] namespace"
            )
        return ExecutorError(f"Kubernetes API: {action} failed ({exc.status}): {detail}")
    at = f" at {server}" if server else ""
    if _is_tls(exc):
        return ExecutorError(
            f"Kubernetes API unreachable{at}: {action}: TLS failed ({_reason(exc)}): check the "
            f"cluster's certificate-authority in {creds}"
        )
    return ExecutorError(
        f"Kubernetes API unreachable{at}: {action}: {_reason(exc)}: check that the cluster is up "
        f"and the server address in {creds} (or [executor] kubeconfig / context)"
    )


class K8sExecutor(Executor):
    """Triton replicas as the pods of one Deployment per engine deployment."""

    manages_replicas: ClassVar[bool] = True

    def __init__(
        self,
        settings: K8sSettings,
        context: BackendContext,
        *,
        api_client: k8s.ApiClient | None = None,
    ):
        self.settings = settings
        self.context = context
        self.log = context.logger.getChild("k8s")
        self.ns = settings.namespace
        self._timeout = settings.request_timeout
        self._client = api_client
        self._client_error: ExecutorError | None = None
        if api_client is None:
            try:
                self._client = make_api_client(settings, context)
            except ExecutorError as exc:
                if settings.kubeconfig or settings.in_cluster:
                    raise  # credentials the operator named must work from the start
                # None named and none found: previews (`bioengine k8s manifest`) need no
                # cluster; the first API request reports the error.
                self._client_error = exc

    @property
    def _api(self) -> k8s.ApiClient:
        """The API client; ExecutorError when no credentials could be loaded."""
        if self._client is None:
            assert self._client_error is not None
            raise ExecutorError(str(self._client_error)) from self._client_error.__cause__
        return self._client

    @cached_property
    def core(self) -> k8s.CoreV1Api:
        """The core/v1 API (pods, services, secrets)."""
        return k8s.CoreV1Api(self._api)

    @cached_property
    def apps(self) -> k8s.AppsV1Api:
        """The apps/v1 API (deployments and their scale)."""
        return k8s.AppsV1Api(self._api)

    # ------------------------------------------------------------------ rendering
    def preview(self, spec: ReplicaSpec) -> str:
        """The Secret (values redacted), Deployment and Service `scale(spec, 1)` applies, as YAML."""
        return m.to_yaml(m.render_all(self.settings, spec, replicas=1))

    def triton_backends(self) -> list[str]:
        """What the configured image provides (setting `triton_backends`)."""
        return list(self.settings.triton_backends)

    def replica_gpus(self) -> list[int] | None:
        """GPU indices as Triton sees them inside each pod (the device plugin numbers from 0);
        `[]` with `gpus = 0`. The `Executor.replica_gpus` contract: the core sets
        `ReplicaSpec.gpus` from it."""
        return list(range(self.settings.gpus))

    def _error(self, action: str, exc: Exception) -> ExecutorError:
        """`exc` from the API client as one line with the cause and the fix."""
        server = self._client.configuration.host if self._client is not None else None
        return _api_error(action, exc, settings=self.settings, server=server)

    # ------------------------------------------------------------------ applying objects
    def _call(
        self, action: str, fn: Any, *args: Any, if_absent: Any = _RAISE, **kwargs: Any
    ) -> Any:
        """`fn(*args, **kwargs)` within the request timeout; failures as ExecutorError naming
        `action`. A 404 answer returns `if_absent` when one is given."""
        kwargs.setdefault("_request_timeout", self._timeout)
        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            if exc.status == 404 and if_absent is not _RAISE:
                return if_absent
            raise self._error(action, exc) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._error(action, exc) from exc

    def _read(self, what: str, fn: Any, name: str) -> Any | None:
        """Read an object as a plain dict (None when absent)."""
        resp = self._call(
            f"read {what} {self.ns}/{name}",
            fn,
            name,
            self.ns,
            _preload_content=False,
            if_absent=None,
        )
        return None if resp is None else json.loads(resp.data)

    def _apply(
        self,
        what: str,
        desired: dict[str, Any],
        *,
        read: Any,
        create: Any,
        patch: Any,
        extra_on_create: dict[str, Any] | None = None,
        check: Any = None,
        secret_values: dict[str, str] | None = None,
    ) -> tuple[dict[str, Any], str]:
        """Create `desired` or bring the existing object in line (a three-way merge patch).

        For a Secret, `desired` carries digests in `stringData` (that is what the last-applied
        annotation records) and `secret_values` the values sent to the API server.
        Returns the object as the server answered and what happened: created, updated, unchanged.
        """
        name = desired["metadata"]["name"]
        text = json.dumps(desired, sort_keys=True, separators=(",", ":"))
        ours = _annotate(desired, text)
        current = self._read(what, read, name)
        if current is None:
            body = _merge(ours, extra_on_create or {})
            if secret_values is not None:
                body["stringData"] = dict(secret_values)
            obj = self._call(f"create {what} {self.ns}/{name}", create, self.ns, body)
            self.log.info("created %s %s/%s", what, self.ns, name)
            return self._api.sanitize_for_serialization(obj), "created"
        self._check_ours(what, name, current)
        if check is not None:
            check(current)
        diff = _patch_for(current, ours, text, secret_values)
        if diff is None:
            return current, "unchanged"
        obj = self._call(
            f"update {what} {self.ns}/{name}", patch, name, self.ns, diff, _content_type=MERGE_PATCH
        )
        self.log.info("updated %s %s/%s", what, self.ns, name)
        return self._api.sanitize_for_serialization(obj), "updated"

    def _check_ours(self, what: str, name: str, current: dict[str, Any]) -> None:
        """ExecutorError unless the existing object carries BioEngine's managed-by label."""
        labels = current.get("metadata", {}).get("labels") or {}
        if labels.get(m.MANAGED_BY[0]) != m.MANAGED_BY[1]:
            raise ExecutorError(
                f"{what} {self.ns}/{name} exists but was not created by BioEngine (label "
                f"{m.MANAGED_BY[0]}={m.MANAGED_BY[1]} missing): delete or rename it, or set "
                "[executor] name_prefix"
            )

    def _apply_secret(self, spec: ReplicaSpec) -> str | None:
        """Apply the Secret with the storage's environment; None when none is needed."""
        secret = m.render_secret(self.settings, spec, redact=False)
        if secret is None:
            return None
        values = dict(secret["stringData"])
        secret["stringData"] = {k: _digest(v) for k, v in values.items()}
        _, done = self._apply(
            "Secret",
            secret,
            read=self.core.read_namespaced_secret,
            create=self.core.create_namespaced_secret,
            patch=self.core.patch_namespaced_secret,
            secret_values=values,
        )
        return done

    def _apply_service(self, spec: ReplicaSpec) -> str:
        """Apply the Service in front of the pods; what happened."""
        _, done = self._apply(
            "Service",
            m.render_service(self.settings, spec),
            read=self.core.read_namespaced_service,
            create=self.core.create_namespaced_service,
            patch=self.core.patch_namespaced_service,
        )
        return done

    def _apply_deployment(self, spec: ReplicaSpec, replicas_on_create: int) -> str:
        """Apply the Deployment; its replica count only when it is created (else: `scale`)."""
        deployment = m.render_deployment(self.settings, spec, replicas_on_create)
        # the replica count is set through the scale subresource (or by an autoscaler)
        del deployment["spec"]["replicas"]
        name = deployment["metadata"]["name"]
        wanted = deployment["spec"]["selector"]["matchLabels"]

        def same_selector(current: dict[str, Any]) -> None:
            have = ((current.get("spec") or {}).get("selector") or {}).get("matchLabels")
            if have is not None and have != wanted:
                raise ExecutorError(
                    f"Deployment {self.ns}/{name} selects pods by {have}, not {wanted}; a "
                    f"selector cannot be changed: delete the Deployment (`kubectl delete "
                    f"deployment -n {self.ns} {name}`) and restart"
                )

        _, done = self._apply(
            "Deployment",
            deployment,
            read=self.apps.read_namespaced_deployment,
            create=self.apps.create_namespaced_deployment,
            patch=self.apps.patch_namespaced_deployment,
            extra_on_create={"spec": {"replicas": replicas_on_create}},
            check=same_selector,
        )
        return done

    def ensure_objects(self, spec: ReplicaSpec, *, replicas_on_create: int = 0) -> dict[str, str]:
        """Create or update the Secret, Service and Deployment of `spec`; what happened to each."""
        done: dict[str, str] = {}
        secret = self._apply_secret(spec)
        if secret is not None:
            done["secret"] = secret
        done["service"] = self._apply_service(spec)
        done["deployment"] = self._apply_deployment(spec, replicas_on_create)
        return done

    def scale(self, spec: ReplicaSpec, replicas: int) -> None:
        """Apply the objects of `spec`, then set the Deployment's replicas via /scale."""
        if replicas < 0:
            raise ExecutorError(f"cannot scale to {replicas} replicas")
        names = m.names_for(self.settings, spec.deployment)
        done = self.ensure_objects(spec, replicas_on_create=replicas)
        if done["deployment"] == "created":
            return
        current = self._read(
            "Deployment scale", self.apps.read_namespaced_deployment_scale, names.base
        )
        have = ((current or {}).get("spec") or {}).get("replicas")
        if have == replicas:
            return
        self._call(
            f"scale Deployment {self.ns}/{names.base}",
            self.apps.patch_namespaced_deployment_scale,
            names.base,
            self.ns,
            {"spec": {"replicas": replicas}},
            _content_type=MERGE_PATCH,
        )
        self.log.info("scaled Deployment %s/%s from %s to %d", self.ns, names.base, have, replicas)

    def delete(self, deployment: str, *, grace: float = 10.0) -> None:
        """Remove the Deployment, Service, Secret and one-off pods of `deployment` (teardown)."""
        names = m.names_for(self.settings, deployment)
        opts = {"grace_period_seconds": int(grace), "propagation_policy": "Foreground"}
        for what, fn, name in (
            ("Deployment", self.apps.delete_namespaced_deployment, names.base),
            ("Service", self.core.delete_namespaced_service, names.base),
            ("Secret", self.core.delete_namespaced_secret, names.secret),
        ):
            self._delete(what, fn, name, **opts)
        for pod in self._pods(deployment):
            if (pod["metadata"].get("labels") or {}).get(m.REPLICA_KIND_LABEL) == "standalone":
                self.stop(pod["metadata"]["name"], grace=grace)

    def _delete(self, what: str, fn: Any, name: str, **kwargs: Any) -> bool:
        """Delete one object; False when it was not there."""
        action = f"delete {what} {self.ns}/{name}"
        return self._call(action, fn, name, self.ns, if_absent=False, **kwargs) is not False

    # ------------------------------------------------------------------ one-off replicas
    def start(self, spec: ReplicaSpec) -> ReplicaStatus:
        """Create one standalone pod (not owned by the Deployment); the engine itself uses scale().

        Meant for `ExecutorConformance` and for trying an image before scaling. The pod restarts
        its container on crashes but is not rescheduled if its node goes away.
        """
        names = m.names_for(self.settings, spec.deployment)
        self._apply_secret(spec)
        name = f"{names.base}-x{secrets.token_hex(3)}"
        body = m.render_pod(self.settings, spec, name)
        obj = self._call(
            f"create Pod {self.ns}/{name}", self.core.create_namespaced_pod, self.ns, body
        )
        pod = self._api.sanitize_for_serialization(obj)
        status = self._status_of(pod)
        if status.state not in (ReplicaState.PENDING, ReplicaState.STARTING):
            status.state = ReplicaState.PENDING
        return status

    # ------------------------------------------------------------------ inspecting
    def _pods(self, deployment: str) -> list[dict[str, Any]]:
        selector = f"{DEPLOYMENT_LABEL}={deployment}"
        resp = self._call(
            f"list pods {self.ns} ({selector})",
            self.core.list_namespaced_pod,
            self.ns,
            label_selector=selector,
            _preload_content=False,
        )
        items = json.loads(resp.data).get("items") or []
        # filter here too: a proxy or an emulator may ignore the selector
        return [
            p
            for p in items
            if (p.get("metadata", {}).get("labels") or {}).get(DEPLOYMENT_LABEL) == deployment
        ]

    def list(self, deployment: str) -> list[ReplicaStatus]:
        """Pods of `deployment` that are neither being deleted nor finished, sorted by name."""
        out = []
        urls: dict[str, str | None] = {}
        for pod in sorted(self._pods(deployment), key=lambda p: p["metadata"]["name"]):
            status = self._status_of(pod, urls)
            if status.state.alive:
                out.append(status)
        return out

    def status(self, replica_id: str) -> ReplicaStatus:
        """The pod's state; STOPPED when it is gone, UNKNOWN when the API cannot be reached."""
        try:
            pod = self._read("Pod", self.core.read_namespaced_pod, replica_id)
        except ExecutorError as exc:
            return ReplicaStatus(replica_id, ReplicaState.UNKNOWN, message=str(exc))
        if pod is None:
            return ReplicaStatus(replica_id, ReplicaState.STOPPED, message="pod not found")
        return self._status_of(pod)

    def stop(self, replica_id: str, *, grace: float = 10.0) -> None:
        """Delete the pod; the Deployment (if it owns the pod) starts a replacement. Idempotent."""
        self._delete(
            "Pod", self.core.delete_namespaced_pod, replica_id, grace_period_seconds=int(grace)
        )

    def logs(self, replica_id: str, *, tail: int = 200) -> str:
        """The last `tail` lines of the Triton container's log (its previous run after a crash)."""
        try:
            resp = self.core.read_namespaced_pod_log(
                replica_id,
                self.ns,
                container=m.CONTAINER,
                tail_lines=tail,
                _preload_content=False,
                _request_timeout=self._timeout,
            )
            return resp.data.decode("utf-8", "replace")
        except ApiException as exc:
            if exc.status == 404:
                return f"(pod {self.ns}/{replica_id} not found)"
            if exc.status == 400:  # container not started yet
                return f"(no log yet: {self._error('logs', exc)})"
            raise self._error(f"logs of pod {self.ns}/{replica_id}", exc) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._error(f"logs of pod {self.ns}/{replica_id}", exc) from exc

    def service_url(self, spec_deployment: str) -> str | None:
        """The Service's base URL as the engine reaches it (route = service); None if unknown."""
        if self.settings.service_url:
            return self.settings.service_url.rstrip("/")
        names = m.names_for(self.settings, spec_deployment)
        port = self.settings.http_port
        if self.settings.service_type == "ClusterIP":
            return f"http://{names.base}.{self.ns}.svc.{self.settings.cluster_domain}:{port}"
        svc = self._read("Service", self.core.read_namespaced_service, names.base)
        if svc is None:
            return None
        if self.settings.service_type == "NodePort":
            return self._node_port_url(svc)
        return _load_balancer_url(svc, port)

    def _node_port_url(self, svc: dict[str, Any]) -> str | None:
        """`node_address` with the node port of the Service's `http` port."""
        node_port = next(
            (p.get("nodePort") for p in svc["spec"].get("ports", []) if p.get("name") == "http"),
            None,
        )
        if node_port and self.settings.node_address:
            return f"http://{url_host(self.settings.node_address)}:{node_port}"
        return None

    def _status_of(
        self, pod: dict[str, Any], urls: dict[str, str | None] | None = None
    ) -> ReplicaStatus:
        """Map a pod (as a dict) onto a ReplicaStatus; `urls` caches Service URLs per call."""
        meta = pod.get("metadata") or {}
        st = pod.get("status") or {}
        labels = dict(meta.get("labels") or {})
        containers = {c.get("name"): c for c in st.get("containerStatuses") or []}
        triton = containers.get(m.CONTAINER) or {}
        details = self._details(pod, triton)
        state, message = _pod_state(meta, st, triton)
        waiting = (triton.get("state") or {}).get("waiting") or {}
        if waiting.get("reason"):
            message = waiting["reason"] + (
                f": {waiting['message']}" if waiting.get("message") else ""
            )
            if waiting["reason"] in _STUCK:
                details["stuck"] = waiting["reason"]
            if waiting["reason"] in _FIXES:
                message += f" ({_FIXES[waiting['reason']]})"
        if details["restarts"] and state is not ReplicaState.READY:
            message += f" ({details['restarts']} restarts)"
        url = None
        if state is ReplicaState.READY:
            url = self._replica_url(labels, st, urls)
            if url is None and self.settings.route == "service":
                message = "the Service has no reachable address yet"
        return ReplicaStatus(
            replica_id=details["pod"],
            state=state,
            url=url,
            host=details["node"],
            message=message,
            labels=labels,
            started_at=_timestamp_str(st.get("startTime") or meta.get("creationTimestamp")),
            details=details,
        )

    def _details(self, pod: dict[str, Any], triton: dict[str, Any]) -> dict[str, Any]:
        """What `bioengine status` shows of a pod: namespace, name, node, IP, phase, restarts."""
        meta = pod.get("metadata") or {}
        st = pod.get("status") or {}
        return {
            "namespace": self.ns,
            "pod": meta.get("name", ""),
            "node": (pod.get("spec") or {}).get("nodeName"),
            "pod_ip": st.get("podIP"),
            "phase": st.get("phase") or "Pending",
            "restarts": int(triton.get("restartCount") or 0),
            "kind": (meta.get("labels") or {}).get(m.REPLICA_KIND_LABEL, "deployment"),
        }

    def _replica_url(
        self, labels: dict[str, str], st: dict[str, Any], urls: dict[str, str | None] | None
    ) -> str | None:
        """Where the engine reaches a ready pod: the Service's URL (route = service, cached in
        `urls` per deployment) or the pod's IP."""
        if self.settings.route == "service":
            dep = labels.get(DEPLOYMENT_LABEL, self.context.deployment)
            urls = {} if urls is None else urls
            if dep not in urls:
                urls[dep] = self.service_url(dep)
            return urls[dep]
        if st.get("podIP"):
            return f"http://{url_host(st['podIP'])}:{self.settings.http_port}"
        return None

    def close(self) -> None:
        """Close the API client's connection pool; the pods keep running."""
        if self._client is None:
            return
        try:
            self._client.close()
        except Exception:  # noqa: BLE001 - closing must never fail the engine's shutdown
            pass


def _pod_state(
    meta: dict[str, Any], st: dict[str, Any], triton: dict[str, Any]
) -> tuple[ReplicaState, str]:
    """A pod's replica state from its phase and conditions, and why (before container notes)."""
    phase = st.get("phase") or "Pending"
    conditions = {c.get("type"): c for c in st.get("conditions") or []}
    if meta.get("deletionTimestamp"):
        return ReplicaState.STOPPING, "pod is being deleted"
    if phase in ("Succeeded", "Failed"):
        term = (triton.get("state") or {}).get("terminated") or {}
        message = st.get("reason") or term.get("reason") or phase
        if st.get("message") or term.get("message"):
            message += f": {st.get('message') or term.get('message')}"
        if term.get("exitCode") is not None:
            message += f" (exit code {term['exitCode']})"
        return ReplicaState.FAILED, message
    if phase == "Running":
        if (conditions.get("Ready") or {}).get("status") == "True":
            return ReplicaState.READY, ""
        return ReplicaState.STARTING, "Triton is not ready yet"
    scheduled = conditions.get("PodScheduled") or {}
    if scheduled.get("status") == "False":
        reason = scheduled.get("reason") or "Unschedulable"
        message = f"{reason}: {scheduled.get('message') or ''}".strip(": ")
        if reason in _FIXES:
            message += f" ({_FIXES[reason]})"
        return ReplicaState.PENDING, message
    return ReplicaState.PENDING, "waiting for the container"


def _load_balancer_url(svc: dict[str, Any], port: int) -> str | None:
    """The first address the Service's load balancer reports, with `port`."""
    ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    for entry in ingress:
        host = entry.get("ip") or entry.get("hostname")
        if host:
            return f"http://{url_host(host)}:{port}"
    return None


def _timestamp_str(value: Any) -> float | None:
    if not value:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _patch_for(
    current: dict[str, Any],
    ours: dict[str, Any],
    text: str,
    secret_values: dict[str, str] | None,
) -> dict[str, Any] | None:
    """The merge patch from what was last applied to `current` to `ours` (whose last-applied
    text is `text`); None when nothing changed. With `secret_values`: values, not digests."""
    annotations = current.get("metadata", {}).get("annotations") or {}
    previous_text = annotations.get(m.LAST_APPLIED)
    if previous_text == text:
        return None
    previous = _annotate(json.loads(previous_text), previous_text) if previous_text else {}
    diff = m.merge_patch(previous, ours)
    if diff is not None and secret_values is not None and "stringData" in diff:
        _secret_patch(diff, previous, secret_values)
    return diff


def _annotate(obj: dict[str, Any], text: str) -> dict[str, Any]:
    """A copy of `obj` with the last-applied annotation set to `text`."""
    out = json.loads(json.dumps(obj))
    meta = out.setdefault("metadata", {})
    meta["annotations"] = {**(meta.get("annotations") or {}), m.LAST_APPLIED: text}
    return out


def _digest(value: str) -> str:
    """What the last-applied annotation records for a secret value (never the value)."""
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()


def _secret_patch(diff: dict[str, Any], previous: dict[str, Any], values: dict[str, str]) -> None:
    """Turn a patch of digests into one of values; removed keys are dropped through `data`."""
    changed = diff.pop("stringData")
    if changed is None:
        removed = list((previous.get("stringData") or {}).keys())
        changed = {}
    else:
        removed = [k for k, v in changed.items() if v is None]
    update = {k: values[k] for k, v in changed.items() if v is not None}
    if update:
        diff["stringData"] = update
    if removed:
        diff.setdefault("data", {}).update({k: None for k in removed})


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(base))
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
