"""BioEngine executor that runs Triton replicas on this host: processes or containers."""

from .container import ContainerExecutor, apptainer_command, container_run_command
from .process import ApptainerExecutor, ProcessExecutor
from .settings import LocalExecutorSettings

__all__ = [
    "ApptainerExecutor",
    "ContainerExecutor",
    "LocalExecutorSettings",
    "ProcessExecutor",
    "apptainer_command",
    "container_run_command",
]
