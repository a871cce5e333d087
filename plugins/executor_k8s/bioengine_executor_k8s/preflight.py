"""Before serving: can the executor reach the cluster and do what it must there?

Offline: the kubeconfig file named (or found) parses and has the context. Online: the API server
answers `/version`, the namespace exists, and a SelfSubjectAccessReview grants each verb the
executor uses. One line per problem, naming the setting or command that fixes it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from bioengine_core.contracts import BackendContext
from bioengine_core.errors import ExecutorError

from .settings import K8sSettings

SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")
TIMEOUT = 5.0
"""Seconds each preflight request may take (at most; `request_timeout` if shorter)."""

# (verb, API group, resource) the executor uses: exactly the Role in docs/kubernetes.md (a test
# keeps the two equal). `create pods` is for one-off replicas (`start()`), `delete` on
# deployments, services and secrets for `bioengine k8s delete`.
NEEDED: tuple[tuple[str, str, str], ...] = (
    ("get", "apps", "deployments"),
    ("create", "apps", "deployments"),
    ("patch", "apps", "deployments"),
    ("delete", "apps", "deployments"),
    ("get", "apps", "deployments/scale"),
    ("patch", "apps", "deployments/scale"),
    ("get", "", "services"),
    ("create", "", "services"),
    ("patch", "", "services"),
    ("delete", "", "services"),
    ("get", "", "secrets"),
    ("create", "", "secrets"),
    ("patch", "", "secrets"),
    ("delete", "", "secrets"),
    ("get", "", "pods"),
    ("list", "", "pods"),
    ("create", "", "pods"),
    ("delete", "", "pods"),
    ("get", "", "pods/log"),
)


def needed_permissions(settings: K8sSettings) -> list[tuple[str, str, str]]:
    """NEEDED, less the Secret when the executor writes none (the repository comes from a
    volume, or from a Secret the operator made)."""
    writes_secret = not (
        settings.repository_secret or settings.repository_pvc or settings.repository_host_path
    )
    return [p for p in NEEDED if writes_secret or p[2] != "secrets"]


def _kubeconfig_file(settings: K8sSettings, context: BackendContext | None) -> tuple[Path, bool]:
    """The kubeconfig the client will read, and whether the operator named it."""
    if settings.kubeconfig:
        path = Path(settings.kubeconfig).expanduser()
        if context is not None:
            path = Path(context.resolve_path(settings.kubeconfig))
        return path, True
    env = [p for p in os.environ.get("KUBECONFIG", "").split(os.pathsep) if p]
    if env:
        return Path(env[0]).expanduser(), True
    return Path("~/.kube/config").expanduser(), False


def check_kubeconfig(settings: K8sSettings, context: BackendContext | None) -> list[str]:
    """Offline: credentials exist where the client will look, the file parses, and the context
    (with its cluster and user) is in it."""
    from .executor import uses_in_cluster

    if uses_in_cluster(settings):
        if settings.in_cluster and not SERVICE_ACCOUNT_TOKEN.is_file():
            return [
                f"in_cluster = true but there is no service-account token at "
                f"{SERVICE_ACCOUNT_TOKEN}: run serve in a pod or set [executor] kubeconfig"
            ]
        return []
    path, named = _kubeconfig_file(settings, context)
    if not path.is_file():
        if not named:
            return []  # reported when the cluster is contacted (online), or by serve
        key = "kubeconfig" if settings.kubeconfig else "kubeconfig ($KUBECONFIG)"
        return [f"{key}: no such file {path}: fix [executor] kubeconfig"]
    try:
        data: Any = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = " ".join(str(exc).split())[:200]
        return [
            f"cannot configure the Kubernetes client from {path}: not YAML ({first}): "
            "fix [executor] kubeconfig / context"
        ]
    if not isinstance(data, dict) or not isinstance(data.get("contexts"), list):
        return [
            f"cannot configure the Kubernetes client from {path}: it has no contexts, it is not "
            "a kubeconfig file: fix [executor] kubeconfig / context"
        ]

    def named_entries(key: str) -> dict[str, Any]:
        entries = data.get(key) or []
        return {e.get("name"): e for e in entries if isinstance(e, dict)}

    contexts = named_entries("contexts")
    wanted = settings.context or data.get("current-context")
    have = ", ".join(sorted(str(n) for n in contexts)) or "none"
    if not wanted:
        return [
            f"kubeconfig {path} sets no current-context: set [executor] context (one of {have})"
        ]
    if wanted not in contexts:
        key = "[executor] context" if settings.context else f"current-context in {path}"
        return [f"context {wanted!r} is not in kubeconfig {path} (it has {have}): fix {key}"]
    entry = contexts[wanted].get("context") or {}
    problems = []
    cluster = named_entries("clusters").get(entry.get("cluster"))
    if cluster is None:
        problems.append(
            f"context {wanted!r} in kubeconfig {path} names cluster {entry.get('cluster')!r}, "
            "which the file does not define"
        )
    elif not (cluster.get("cluster") or {}).get("server"):
        problems.append(f"cluster {entry.get('cluster')!r} in kubeconfig {path} has no server")
    if entry.get("user") and entry.get("user") not in named_entries("users"):
        problems.append(
            f"context {wanted!r} in kubeconfig {path} names user {entry.get('user')!r}, "
            "which the file does not define"
        )
    return problems


def check_cluster(settings: K8sSettings, context: BackendContext | None) -> list[str]:
    """Online: the API server answers, the namespace exists, the permissions are granted."""
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    from .executor import _api_error, credentials_label, make_api_client

    if not uses_in_cluster(settings) and not _kubeconfig_file(settings, context)[0].is_file():
        return [
            "no Kubernetes credentials: set [executor] kubeconfig (or $KUBECONFIG, "
            "~/.kube/config), or run serve in a pod with a service account"
        ]
    try:
        api = make_api_client(settings, context, retries=0)
    except ExecutorError as exc:
        return [str(exc)]
    timeout = min(TIMEOUT, settings.request_timeout)
    server = api.configuration.host
    ns = settings.namespace
    creds = credentials_label(settings)
    try:
        try:
            api.call_api(  # VersionApi asks /version/, which not every server answers
                "/version",
                "GET",
                auth_settings=["BearerToken"],
                _request_timeout=timeout,
                _preload_content=False,
            )
        except ApiException as exc:
            if exc.status == 401:
                return [str(_api_error("GET /version", exc, settings=settings))]
            return [
                f"{server} answers HTTP {exc.status} at /version: it does not look like a "
                f"Kubernetes API server; check the cluster's server in {creds}"
            ]
        except Exception as exc:  # noqa: BLE001 - urllib3 raises many kinds; all mean "no server"
            return [_unreachable(exc, server, creds)]
        try:
            k8s.CoreV1Api(api).read_namespace(ns, _request_timeout=timeout)
        except ApiException as exc:
            if exc.status == 404:
                return [
                    f"namespace {ns!r} does not exist: create it (`kubectl create namespace "
                    f"{ns}`) or fix [executor] namespace"
                ]
            if exc.status == 401:
                return [str(_api_error(f"read namespace {ns}", exc, settings=settings))]
            # 403: a namespaced Role may not read Namespace objects; the reviews below tell
        except Exception as exc:  # noqa: BLE001
            return [_unreachable(exc, server, creds)]
        denied = []
        auth = k8s.AuthorizationV1Api(api)
        for verb, group, resource in needed_permissions(settings):
            plural, _, sub = resource.partition("/")
            body = {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SelfSubjectAccessReview",
                "spec": {
                    "resourceAttributes": {
                        "namespace": ns,
                        "group": group,
                        "resource": plural,
                        "subresource": sub or None,
                        "verb": verb,
                    }
                },
            }
            try:
                resp = auth.create_self_subject_access_review(
                    body, _request_timeout=timeout, _preload_content=False
                )
            except ApiException as exc:
                if exc.status == 401:
                    return [str(_api_error("SelfSubjectAccessReview", exc, settings=settings))]
                return []  # the cluster does not answer access reviews: nothing to tell
            except Exception as exc:  # noqa: BLE001
                return [_unreachable(exc, server, creds)]
            status = (json.loads(resp.data) or {}).get("status") or {}
            if not status.get("allowed"):
                denied.append(f"{verb} {resource + ('.' + group if group else '')}")
        if denied:
            return [
                f"the credentials of {creds} may not {', '.join(denied)} in namespace {ns}: "
                "grant them (docs/kubernetes.md has the Role the executor needs)"
            ]
        return []
    finally:
        api.close()


def _unreachable(exc: BaseException, server: str, creds: str) -> str:
    """No (working) API server at `server`: why, and where its address comes from."""
    from .executor import _is_tls, _reason

    if _is_tls(exc):
        return (
            f"TLS to the Kubernetes API at {server} failed ({_reason(exc)}): check the "
            f"cluster's certificate-authority in {creds} ([executor] kubeconfig / context)"
        )
    return (
        f"no Kubernetes API answers at {server} ({_reason(exc)}): check that the cluster is up "
        f"and the server address in {creds} ([executor] kubeconfig / context)"
    )


def preflight(*, settings: K8sSettings, context: BackendContext | None, offline: bool) -> list[str]:
    """The kubeconfig (offline); the API server, namespace and permissions (online)."""
    problems = check_kubeconfig(settings, context)
    if problems or offline:
        return problems
    return check_cluster(settings, context)


def uses_in_cluster(settings: K8sSettings) -> bool:
    """See `executor.uses_in_cluster` (imported lazily: the client is slow to import)."""
    from .executor import uses_in_cluster as real

    return real(settings)


__all__ = ["NEEDED", "check_cluster", "check_kubeconfig", "needed_permissions", "preflight"]
