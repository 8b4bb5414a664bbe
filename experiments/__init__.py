"""Experiments: bundled tasks, ablation runner, statistics, plots, reports and the CLI.

Re-exported: :class:`~layerwise.experiments.history_file.HistoryFile` (the engine's
history as a CSV or Parquet file), imported on first use so that importing the package
(e.g. for the CLI) stays light.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("layerwise-lr")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = ["HistoryFile", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "HistoryFile":
        from layerwise.experiments.history_file import HistoryFile

        return HistoryFile
    raise AttributeError(f"module 'layerwise.experiments' has no attribute {name!r}")
