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
import secrets
from datetime import datetime
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

from . import manifests as m
from .settings import K8sSettings

MERGE_PATCH = "application/merge-patch+json"

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


def make_api_client(settings: K8sSettings, context: BackendContext | None = None) -> k8s.ApiClient:
    """An ApiClient from the settings: in-cluster credentials or a kubeconfig file."""
    in_cluster = settings.in_cluster
    if in_cluster is None:
        in_cluster = settings.kubeconfig is None and bool(os.environ.get("KUBERNETES_SERVICE_HOST"))
    try:
        if in_cluster:
            cfg = k8s.Configuration()
            k8s_config.load_incluster_config(client_configuration=cfg)
            return k8s.ApiClient(cfg)
        path = None
        if settings.kubeconfig:
            path = str(
                context.resolve_path(settings.kubeconfig) if context else settings.kubeconfig
            )
        return k8s_config.new_client_from_config(config_file=path, context=settings.context)
    except (k8s_config.ConfigException, OSError) as exc:
        where = "in-cluster credentials" if in_cluster else (settings.kubeconfig or "kubeconfig")
        raise ExecutorError(f"cannot configure the Kubernetes client from {where}: {exc}") from exc


def _api_error(action: str, exc: Exception) -> ExecutorError:
    if isinstance(exc, ApiException):
        detail = exc.reason or ""
        try:
            detail = json.loads(exc.body or "{}").get("message") or detail
        except (ValueError, AttributeError):
            pass
        return ExecutorError(f"Kubernetes API: {action} failed ({exc.status}): {detail}")
    return ExecutorError(f"Kubernetes API unreachable: {action}: {exc}")


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
        self._api = api_client or make_api_client(settings, context)
        self.core = k8s.CoreV1Api(self._api)
        self.apps = k8s.AppsV1Api(self._api)
        self.ns = settings.namespace
        self._timeout = settings.request_timeout

    # ------------------------------------------------------------------ rendering
    def preview(self, spec: ReplicaSpec) -> str:
        """The Secret (values redacted), Deployment and Service `scale(spec, 1)` applies, as YAML."""
        return m.to_yaml(m.render_all(self.settings, spec, replicas=1))

    def triton_backends(self) -> list[str]:
        """What the configured image provides (setting `triton_backends`)."""
        return list(self.settings.triton_backends)

    def replica_gpus(self) -> list[int]:
        """GPU indices as Triton sees them inside each pod (the device plugin numbers from 0)."""
        return list(range(self.settings.gpus))

    # ------------------------------------------------------------------ applying objects
    def _call(self, action: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("_request_timeout", self._timeout)
        try:
            return fn(*args, **kwargs)
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise _api_error(action, exc) from exc

    def _read(self, what: str, fn: Any, name: str) -> Any | None:
        """Read an object as a plain dict (None when absent)."""
        try:
            resp = fn(name, self.ns, _preload_content=False, _request_timeout=self._timeout)
            return json.loads(resp.data)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _api_error(f"read {what} {self.ns}/{name}", exc) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _api_error(f"read {what} {self.ns}/{name}", exc) from exc

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
        labels = current.get("metadata", {}).get("labels") or {}
        if labels.get(m.MANAGED_BY[0]) != m.MANAGED_BY[1]:
            raise ExecutorError(
                f"{what} {self.ns}/{name} exists but was not created by BioEngine (label "
                f"{m.MANAGED_BY[0]}={m.MANAGED_BY[1]} missing): delete or rename it, or set "
                "[executor] name_prefix"
            )
        if check is not None:
            check(current)
        annotations = current.get("metadata", {}).get("annotations") or {}
        previous_text = annotations.get(m.LAST_APPLIED)
        if previous_text == text:
            return current, "unchanged"
        previous = _annotate(json.loads(previous_text), previous_text) if previous_text else {}
        diff = m.merge_patch(previous, ours)
        if diff is None:
            return current, "unchanged"
        if secret_values is not None and "stringData" in diff:
            _secret_patch(diff, previous, secret_values)
        obj = self._call(
            f"update {what} {self.ns}/{name}", patch, name, self.ns, diff, _content_type=MERGE_PATCH
        )
        self.log.info("updated %s %s/%s", what, self.ns, name)
        return self._api.sanitize_for_serialization(obj), "updated"

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

    def ensure_objects(self, spec: ReplicaSpec, *, replicas_on_create: int = 0) -> dict[str, str]:
        """Create or update the Secret, Service and Deployment of `spec`; what happened to each."""
        done: dict[str, str] = {}
        secret = self._apply_secret(spec)
        if secret is not None:
            done["secret"] = secret
        _, done["service"] = self._apply(
            "Service",
            m.render_service(self.settings, spec),
            read=self.core.read_namespaced_service,
            create=self.core.create_namespaced_service,
            patch=self.core.patch_namespaced_service,
        )
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

        _, done["deployment"] = self._apply(
            "Deployment",
            deployment,
            read=self.apps.read_namespaced_deployment,
            create=self.apps.create_namespaced_deployment,
            patch=self.apps.patch_namespaced_deployment,
            extra_on_create={"spec": {"replicas": replicas_on_create}},
            check=same_selector,
        )
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
        try:
            fn(name, self.ns, _request_timeout=self._timeout, **kwargs)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise _api_error(f"delete {what} {self.ns}/{name}", exc) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _api_error(f"delete {what} {self.ns}/{name}", exc) from exc

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
        selector = f"{m.DEPLOYMENT_LABEL}={deployment}"
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
            if (p.get("metadata", {}).get("labels") or {}).get(m.DEPLOYMENT_LABEL) == deployment
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
                return f"(no log yet: {_api_error('logs', exc)})"
            raise _api_error(f"logs of pod {self.ns}/{replica_id}", exc) from exc
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise _api_error(f"logs of pod {self.ns}/{replica_id}", exc) from exc

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
            node_port = next(
                (
                    p.get("nodePort")
                    for p in svc["spec"].get("ports", [])
                    if p.get("name") == "http"
                ),
                None,
            )
            if node_port and self.settings.node_address:
                return f"http://{_host(self.settings.node_address)}:{node_port}"
            return None
        ingress = ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        for entry in ingress:
            host = entry.get("ip") or entry.get("hostname")
            if host:
                return f"http://{_host(host)}:{port}"
        return None

    def _status_of(
        self, pod: dict[str, Any], urls: dict[str, str | None] | None = None
    ) -> ReplicaStatus:
        """Map a pod (as a dict) onto a ReplicaStatus; `urls` caches Service URLs per call."""
        meta = pod.get("metadata") or {}
        st = pod.get("status") or {}
        name = meta.get("name", "")
        labels = dict(meta.get("labels") or {})
        phase = st.get("phase") or "Pending"
        conditions = {c.get("type"): c for c in st.get("conditions") or []}
        containers = {c.get("name"): c for c in st.get("containerStatuses") or []}
        triton = containers.get(m.CONTAINER) or {}
        restarts = int(triton.get("restartCount") or 0)
        details: dict[str, Any] = {
            "namespace": self.ns,
            "pod": name,
            "node": (pod.get("spec") or {}).get("nodeName"),
            "pod_ip": st.get("podIP"),
            "phase": phase,
            "restarts": restarts,
            "kind": labels.get(m.REPLICA_KIND_LABEL, "deployment"),
        }
        started = _timestamp_str(st.get("startTime") or meta.get("creationTimestamp"))
        message = ""
        ready = (conditions.get("Ready") or {}).get("status") == "True"
        waiting = (triton.get("state") or {}).get("waiting") or {}
        if meta.get("deletionTimestamp"):
            state, message = ReplicaState.STOPPING, "pod is being deleted"
        elif phase in ("Succeeded", "Failed"):
            state = ReplicaState.FAILED
            term = (triton.get("state") or {}).get("terminated") or {}
            message = st.get("reason") or term.get("reason") or phase
            if st.get("message") or term.get("message"):
                message += f": {st.get('message') or term.get('message')}"
            if term.get("exitCode") is not None:
                message += f" (exit code {term['exitCode']})"
        elif ready and phase == "Running":
            state = ReplicaState.READY
        elif phase == "Running":
            state = ReplicaState.STARTING
            message = "Triton is not ready yet"
        else:
            state = ReplicaState.PENDING
            scheduled = conditions.get("PodScheduled") or {}
            if scheduled.get("status") == "False":
                message = f"{scheduled.get('reason') or 'Unschedulable'}: {scheduled.get('message') or ''}".strip(
                    ": "
                )
            else:
                message = "waiting for the container"
        if waiting.get("reason"):
            message = waiting["reason"] + (
                f": {waiting['message']}" if waiting.get("message") else ""
            )
            if waiting["reason"] in _STUCK:
                details["stuck"] = waiting["reason"]
        if restarts and state is not ReplicaState.READY:
            message += f" ({restarts} restarts)"
        url = None
        if state is ReplicaState.READY:
            if self.settings.route == "service":
                dep = labels.get(m.DEPLOYMENT_LABEL, self.context.deployment)
                urls = {} if urls is None else urls
                if dep not in urls:
                    urls[dep] = self.service_url(dep)
                url = urls[dep]
                if url is None:
                    message = "the Service has no reachable address yet"
            elif st.get("podIP"):
                url = f"http://{_host(st['podIP'])}:{self.settings.http_port}"
        return ReplicaStatus(
            replica_id=name,
            state=state,
            url=url,
            host=details["node"],
            message=message,
            labels=labels,
            started_at=started,
            details=details,
        )

    def close(self) -> None:
        """Close the API client's connection pool; the pods keep running."""
        try:
            self._api.close()
        except Exception:  # noqa: BLE001 - closing must never fail the engine's shutdown
            pass


def _host(address: str) -> str:
    return f"[{address}]" if ":" in address and not address.startswith("[") else address


def _timestamp_str(value: Any) -> float | None:
    if not value:
        return None
    if isinstance(value, datetime):
        return value.timestamp()
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


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
