"""Argument checks of the controller's settings: each error names the setting and the value.

>>> real_in("alpha", 0.5, 0.0, math.inf, open_hi=True)
0.5
>>> int_at_least("cooldown", 2, 0)
2
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["int_at_least", "real_in", "settings_from_mapping"]

T = TypeVar("T")


def real_in(
    name: str, value: Any, lo: float, hi: float, *, open_lo: bool = False, open_hi: bool = False
) -> float:
    """``value`` as a float in the interval from ``lo`` to ``hi`` (open or closed at each
    end); ``hi = inf`` with a closed end admits ``inf`` itself. NaN is always refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    above = v > lo if open_lo else v >= lo
    below = v < hi if open_hi else v <= hi
    if math.isnan(v) or not (above and below):
        span = f"{'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"
        raise ValueError(f"{name} must be in {span}, got {value!r}")
    return v


def int_at_least(name: str, value: Any, lo: int) -> int:
    """``value`` as an int >= ``lo`` (bools and floats refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value!r}")
    return int(value)


def settings_from_mapping(cls: type[T], data: Any, where: str) -> T:
    """``cls(**data)`` for a settings dataclass ``cls``; ``data`` that is not a mapping is a
    ``TypeError`` and an unknown key a ``ValueError``, both naming ``where`` and the keys."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, Mapping):
        raise TypeError(f"{where} must be a {cls.__name__} or a mapping, got {data!r}")
    known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**data)
