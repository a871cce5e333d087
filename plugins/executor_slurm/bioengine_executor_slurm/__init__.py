"""BioEngine executor for SLURM: Triton replicas as batch jobs on an HPC cluster."""

from .executor import SlurmExecutor
from .settings import SlurmSettings

__all__ = ["SlurmExecutor", "SlurmSettings"]
__version__ = "0.1.0"
