"""The schedule kinds: one small frozen dataclass each, arguments validated at construction.

The maths of each kind is documented on its factory in :mod:`layerwise.policies.schedules`; the
arithmetic here follows the evaluation order of torch's closed forms
(``torch.optim.lr_scheduler``), so the two agree to rounding. All maths is in Python
floats (IEEE double).
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, ClassVar

from layerwise.policies.schedule_base import Schedule, check_int, check_real, from_spec

__all__ = [
    "Constant",
    "Cosine",
    "CosineWarmRestarts",
    "Exponential",
    "Join",
    "LinearWarmup",
    "MultiStep",
    "Polynomial",
    "Step",
]


def _increasing_ints(name: str, values: Any, *, minimum: int) -> tuple[int, ...]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise TypeError(f"{name} must be a sequence of integers, got {values!r}")
    out = tuple(check_int(f"{name}[{i}]", v, minimum=minimum) for i, v in enumerate(values))
    if any(b <= a for a, b in pairwise(out)):
        raise ValueError(f"{name} must be strictly increasing, got {list(out)}")
    return out


@dataclass(frozen=True)
class Constant(Schedule):
    value: float = 1.0
    name: ClassVar[str] = "constant"

    def __post_init__(self) -> None:
        self._set("value", check_real("value", self.value, low=0.0, low_open=True))

    def _value(self, step: int) -> float:
        return self.value


@dataclass(frozen=True)
class LinearWarmup(Schedule):
    steps: int
    init: float = 0.0
    name: ClassVar[str] = "linear_warmup"

    def __post_init__(self) -> None:
        self._set("steps", check_int("steps", self.steps, minimum=1))
        self._set("init", check_real("init", self.init, low=0.0, high=1.0))

    def _value(self, step: int) -> float:
        if step >= self.steps:
            return 1.0
        return self.init + (1.0 - self.init) * step / self.steps


@dataclass(frozen=True)
class Step(Schedule):
    step_size: int
    gamma: float = 0.1
    name: ClassVar[str] = "step"

    def __post_init__(self) -> None:
        self._set("step_size", check_int("step_size", self.step_size, minimum=1))
        self._set("gamma", check_real("gamma", self.gamma, low=0.0, high=1.0, low_open=True))

    def _value(self, step: int) -> float:
        return self.gamma ** (step // self.step_size)


@dataclass(frozen=True)
class MultiStep(Schedule):
    milestones: tuple[int, ...]
    gamma: float = 0.1
    name: ClassVar[str] = "multistep"

    def __post_init__(self) -> None:
        milestones = _increasing_ints("milestones", self.milestones, minimum=1)
        if not milestones:
            raise ValueError("milestones must not be empty (use constant() for no decay)")
        self._set("milestones", milestones)
        self._set("gamma", check_real("gamma", self.gamma, low=0.0, high=1.0, low_open=True))

    def _value(self, step: int) -> float:
        return self.gamma ** bisect_right(self.milestones, step)


@dataclass(frozen=True)
class Exponential(Schedule):
    gamma: float
    name: ClassVar[str] = "exponential"

    def __post_init__(self) -> None:
        self._set("gamma", check_real("gamma", self.gamma, low=0.0, high=1.0, low_open=True))

    def _value(self, step: int) -> float:
        return self.gamma**step


@dataclass(frozen=True)
class Cosine(Schedule):
    total_steps: int
    floor: float = 0.0
    name: ClassVar[str] = "cosine"

    def __post_init__(self) -> None:
        self._set("total_steps", check_int("total_steps", self.total_steps, minimum=1))
        self._set("floor", check_real("floor", self.floor, low=0.0, high=1.0))

    def _value(self, step: int) -> float:
        t = min(step, self.total_steps)
        return self.floor + (1.0 - self.floor) * (1 + math.cos(math.pi * t / self.total_steps)) / 2


@dataclass(frozen=True)
class CosineWarmRestarts(Schedule):
    period: int
    period_mult: int = 1
    decay: float = 1.0
    floor: float = 0.0
    name: ClassVar[str] = "cosine_warm_restarts"

    def __post_init__(self) -> None:
        self._set("period", check_int("period", self.period, minimum=1))
        self._set("period_mult", check_int("period_mult", self.period_mult, minimum=1))
        self._set("decay", check_real("decay", self.decay, low=0.0, high=1.0, low_open=True))
        self._set("floor", check_real("floor", self.floor, low=0.0, high=1.0))

    def cycle(self, step: int) -> tuple[int, int, int]:
        """``(cycle index, steps since its restart, its length)`` at a step (exact integers)."""
        step = check_int("step", step, minimum=0)
        if self.period_mult == 1:
            index, since = divmod(step, self.period)
            return index, since, self.period
        index, start, length = 0, 0, self.period
        while step >= start + length:  # O(log step) iterations: lengths grow geometrically
            start, length, index = start + length, length * self.period_mult, index + 1
        return index, step - start, length

    def _value(self, step: int) -> float:
        index, since, length = self.cycle(step)
        peak = max(self.decay**index, self.floor)
        return self.floor + (peak - self.floor) * (1 + math.cos(math.pi * since / length)) / 2


@dataclass(frozen=True)
class Polynomial(Schedule):
    total_steps: int
    power: float = 1.0
    floor: float = 0.0
    name: ClassVar[str] = "polynomial"

    def __post_init__(self) -> None:
        self._set("total_steps", check_int("total_steps", self.total_steps, minimum=1))
        self._set("power", check_real("power", self.power, low=0.0, low_open=True))
        self._set("floor", check_real("floor", self.floor, low=0.0, high=1.0))

    def _value(self, step: int) -> float:
        remaining = (1.0 - min(self.total_steps, step) / self.total_steps) ** self.power
        return self.floor + (1.0 - self.floor) * remaining


@dataclass(frozen=True)
class Join(Schedule):
    schedules: tuple[Schedule, ...]
    boundaries: tuple[int, ...]
    name: ClassVar[str] = "join"

    def __post_init__(self) -> None:
        schedules = self.schedules
        if isinstance(schedules, Schedule) or not isinstance(schedules, Sequence):
            raise TypeError(f"schedules must be a sequence of schedules, got {schedules!r}")
        for i, s in enumerate(schedules):
            if not isinstance(s, Schedule):
                raise TypeError(f"schedules[{i}] must be a Schedule, got {s!r}")
        if not schedules:
            raise ValueError("schedules must hold at least one schedule, got []")
        boundaries = _increasing_ints("boundaries", self.boundaries, minimum=1)
        if len(boundaries) != len(schedules) - 1:
            raise ValueError(
                f"boundaries must hold one fewer entry than schedules ({len(schedules) - 1}), "
                f"got {len(boundaries)}: {list(boundaries)}"
            )
        self._set("schedules", tuple(schedules))
        self._set("boundaries", boundaries)

    @classmethod
    def _args_from_spec(cls, args: dict[str, Any]) -> dict[str, Any]:
        specs = args.get("schedules")
        if isinstance(specs, Sequence) and not isinstance(specs, str | bytes):
            args = {**args, "schedules": [from_spec(s) for s in specs]}
        return args

    def _value(self, step: int) -> float:
        index = bisect_right(self.boundaries, step)
        start = self.boundaries[index - 1] if index else 0
        return self.schedules[index]._value(step - start)
