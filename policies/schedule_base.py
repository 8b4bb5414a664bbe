"""The :class:`Schedule` base class, argument checks, and rebuilding schedules from specs.

A schedule is a pure function of the (integer, zero-based) optimisation step that returns
the dimensionless factor multiplying a base learning rate. Every kind is a small frozen
dataclass whose fields are its arguments, so that it

- validates its arguments once, at construction (``ValueError``/``TypeError`` naming the
  argument and the value);
- compares by value (``==``) and has a readable ``repr``;
- describes itself as plain JSON-able data, ``schedule.spec == {"name": ..., **args}``,
  which :func:`from_spec` turns back into an equal schedule (TOML configs, run manifests,
  scheduler checkpoints). No lambdas anywhere, so nothing needs pickling.

Kinds register themselves by their ``name`` when their class is defined.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from abc import ABC, abstractmethod
from collections.abc import Mapping
from numbers import Real
from typing import Any, ClassVar

__all__ = ["Schedule", "check_int", "check_real", "from_spec", "registered"]

_REGISTRY: dict[str, type[Schedule]] = {}


def check_real(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a finite float inside the given interval, or raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        left = "-inf" if low is None else f"{low:g}"
        right = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{left}, {right}"
        interval += ")" if high_open or high is None else "]"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")
    return value


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """Return ``value`` as an int (``operator.index``; bools and floats refused) >= ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r} (bool)")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be an integer, got {value!r} ({type(value).__name__})"
        ) from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, Schedule):
        return value.spec
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    return value


class Schedule(ABC):
    """A factor of the step: ``schedule(step) -> float``, pure, defined for every step >= 0.

    Subclasses are frozen dataclasses with a class attribute ``name`` and implement
    :meth:`_value` for a validated non-negative ``int`` step. Schedules with a finite
    horizon hold their final value for every step past it.
    """

    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is not None:
            if name in _REGISTRY:
                raise ValueError(f"schedule name {name!r} is already registered")
            _REGISTRY[name] = cls

    def __call__(self, step: int) -> float:
        """The factor at ``step`` (a non-negative integer; 0 is the first step)."""
        return self._value(check_int("step", step, minimum=0))

    @abstractmethod
    def _value(self, step: int) -> float:
        """The factor at a validated step."""

    @property
    def spec(self) -> dict[str, Any]:
        """Plain JSON-able description ``{"name": kind, **arguments}``; see :func:`from_spec`."""
        args = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        return {"name": self.name, **args}

    @classmethod
    def _args_from_spec(cls, args: dict[str, Any]) -> dict[str, Any]:
        """Turn the arguments of a spec into constructor arguments (nested specs, say)."""
        return args

    def _set(self, field: str, value: Any) -> None:
        """Store a normalised field value on the frozen dataclass (for ``__post_init__``)."""
        object.__setattr__(self, field, value)


def registered() -> tuple[str, ...]:
    """Names of every registered schedule kind, sorted."""
    return tuple(sorted(_REGISTRY))


def from_spec(spec: Mapping[str, Any]) -> Schedule:
    """Rebuild a schedule from its :attr:`Schedule.spec` (e.g. read back from TOML or JSON).

    ``spec`` is a mapping with a ``"name"`` among :func:`registered` and that kind's
    arguments; arguments left out take their defaults. Unknown names, unknown or missing
    arguments and invalid values raise ``ValueError``/``TypeError`` saying which.

    >>> from layerwise.policies import schedules
    >>> s = schedules.cosine(100, floor=0.1)
    >>> schedules.from_spec(s.spec) == s
    True
    """
    if not isinstance(spec, Mapping):
        raise TypeError(f"spec must be a mapping with a 'name', got {spec!r}")
    args = dict(spec)
    name = args.pop("name", None)
    if not isinstance(name, str):
        raise ValueError(f"spec must have a string 'name', got {spec!r}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown schedule name {name!r} in spec; expected one of {registered()}")
    cls = _REGISTRY[name]
    fields = dataclasses.fields(cls)
    known = [f.name for f in fields]
    unknown = sorted(set(args) - set(known))
    if unknown:
        raise ValueError(
            f"unknown argument(s) {unknown} for schedule {name!r}; expected some of {known}"
        )
    required = [
        f.name
        for f in fields
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [key for key in required if key not in args]
    if missing:
        raise ValueError(f"missing argument(s) {missing} for schedule {name!r} in spec {spec!r}")
    return cls(**cls._args_from_spec(args))
