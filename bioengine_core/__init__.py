"""BioEngine core: contracts, plugin manager, site config, engine and CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("bioengine")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
