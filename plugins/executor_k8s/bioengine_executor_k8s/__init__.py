"""BioEngine executor plugin: Triton replicas as a Kubernetes Deployment + Service."""

from .executor import K8sExecutor, make_api_client
from .settings import K8sSettings, Toleration

__all__ = ["K8sExecutor", "K8sSettings", "Toleration", "make_api_client"]
