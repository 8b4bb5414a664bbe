"""Argument checks of the controller's settings (each error names the setting and the value),
and :func:`exp_text`, which writes ``exp(x)`` for any finite ``x`` without overflowing.

>>> real_in("alpha", 0.5, 0.0, math.inf, open_hi=True)
0.5
>>> int_at_least("cooldown", 2, 0)
2
>>> exp_text(math.log(2.5)), exp_text(1435.0)
('2.5', '1.631e+623')
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from typing import Any, TypeVar

__all__ = ["exp_text", "int_at_least", "real_in", "settings_from_mapping"]

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


_LN10 = math.log(10.0)


def exp_text(log_value: float) -> str:
    """``exp(log_value)`` as text with 4 significant digits (``%.4g``), for any real
    ``log_value``, so that a reason text can always be written: ``math.exp`` raises
    ``OverflowError`` above about 709, and a result below about 1e-308 loses digits, so
    outside [-700, 700] the text is built from the decimal exponent ``log_value / ln 10``
    (and is ``exp(x)`` itself once that exponent passes 1e11, where its fraction is lost to
    rounding)."""
    x = float(log_value)
    if not math.isfinite(x):
        return repr(math.exp(x)) if x == -math.inf else repr(x)  # nan, inf; 0.0 for -inf
    if -700.0 <= x <= 700.0:
        return f"{math.exp(x):.4g}"
    decimal = x / _LN10
    if abs(decimal) >= 1e11:
        return f"exp({x:.4g})"
    exponent = math.floor(decimal)
    mantissa = 10.0 ** (decimal - exponent)  # in [1, 10)
    text = f"{mantissa:.4g}"
    if text == "10":  # rounded up to the next power of ten
        text, exponent = "1", exponent + 1
    return f"{text}e{exponent:+d}"
