"""BioEngine executor that runs each Triton replica on a remote host over ssh."""

from .executor import SshExecutor
from .settings import SshSettings

__all__ = ["SshExecutor", "SshSettings"]
