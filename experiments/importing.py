"""Resolve ``package.module:attribute`` import paths given on the command line or in configs."""

from __future__ import annotations

import importlib
from typing import Any

from layerwise.experiments.errors import UsageError

__all__ = ["import_object"]


def import_object(path: str, *, what: str = "object") -> Any:
    """Import ``package.module:attr`` (``attr`` may be dotted) and return the attribute.

    >>> import_object("math:sqrt")(9.0)
    3.0

    Raises :class:`~layerwise.experiments.errors.UsageError` naming the path when it does not
    resolve.
    """
    if not isinstance(path, str) or path.count(":") != 1:
        raise UsageError(f"{what} must be given as 'package.module:name', got {path!r}")
    module_name, attr = path.split(":")
    if not module_name or not attr:
        raise UsageError(f"{what} must be given as 'package.module:name', got {path!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise UsageError(f"{what} {path!r}: cannot import module {module_name!r} ({exc})") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise UsageError(f"{what} {path!r}: module {module_name!r} has no {attr!r}") from exc
    return obj
