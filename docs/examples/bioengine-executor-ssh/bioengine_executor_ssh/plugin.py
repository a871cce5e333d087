"""Entry point of the plugin: registers the `ssh` executor with BioEngine."""

from bioengine_core.contracts import BackendContext, ExecutorType
from bioengine_core.hookspecs import hookimpl

from .settings import SshSettings


def make_ssh_executor(*, settings: SshSettings, context: BackendContext):
    """Factory named in the record; imports the executor only when it is configured."""
    from .executor import SshExecutor

    return SshExecutor(settings, context)


@hookimpl
def bioengine_register_executors() -> list[ExecutorType]:
    """Register `[executor] kind = "ssh"`."""
    return [
        ExecutorType(
            name="ssh",
            settings=SshSettings,
            factory=make_ssh_executor,
            description="Triton replicas as background processes on a host reached over ssh",
        )
    ]
