"""Optional dependencies: which extra brings which module, and the one-line message when
one is missing.

The core (``layerwise.sensitivity``, ``layerwise.policies``, ``layerwise.engine``) needs
torch, numpy, scipy and pandas only. Plots, terminal tables, the bundled data sets and
Parquet files need the ``experiments`` extra; each module imports them where it uses them.

>>> missing_extra(ModuleNotFoundError("No module named 'rich'", name="rich"))
"rich is not installed (extra 'experiments'): pip install 'layerwise-lr[experiments]'"
>>> missing_extra(ModuleNotFoundError("No module named 'mymodule'", name="mymodule")) is None
True
"""

from __future__ import annotations

import importlib
from types import ModuleType

from layerwise.experiments.errors import CLIError

__all__ = ["EXTRAS", "MissingExtraError", "missing_extra", "require"]

#: Top-level module name -> (distribution name, the extra of layerwise-lr that installs it).
EXTRAS: dict[str, tuple[str, str]] = {
    "matplotlib": ("matplotlib", "experiments"),
    "rich": ("rich", "experiments"),
    "sklearn": ("scikit-learn", "experiments"),
    "mnist1d": ("mnist1d", "experiments"),
    "pyarrow": ("pyarrow", "experiments"),
    "ray": ("ray", "ray"),
}


class MissingExtraError(CLIError, ImportError):
    """An optional dependency is not installed; the message names the extra."""


def missing_extra(exc: BaseException) -> str | None:
    """The one-line message for an ``ImportError`` of an optional dependency, else ``None``."""
    name = getattr(exc, "name", None)
    if not isinstance(exc, ImportError) or not name:
        return None
    top = name.split(".")[0]
    if top not in EXTRAS:
        return None
    dist, extra = EXTRAS[top]
    return f"{dist} is not installed (extra {extra!r}): pip install 'layerwise-lr[{extra}]'"


def require(module: str) -> ModuleType:
    """Import ``module`` (an optional dependency) or raise :class:`MissingExtraError`."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        message = missing_extra(exc)
        if message is None:
            raise
        raise MissingExtraError(message) from exc
