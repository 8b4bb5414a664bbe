"""Experiments: bundled tasks, ablation runner, statistics, plots, reports and the CLI."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("layerwise-lr")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = ["__version__"]
