"""Base learning-rate schedules: factories of pure functions of the step (optax style).

Each factory validates its arguments at once and returns a :class:`Schedule`, a callable
``step -> factor`` where ``step`` is the zero-based number of optimisation steps taken
and ``factor`` the dimensionless number that multiplies a base learning rate (so
``lr(t) = base_lr * schedule(t)``). Schedules are pure; those with a horizon hold their
final value after it; a negative step raises ``ValueError``. Every schedule has a
JSON-able ``.spec`` and :func:`from_spec` rebuilds it.

Conventions match ``torch.optim.lr_scheduler`` where torch has the same schedule
(``t`` is torch's ``last_epoch``): ``step`` = ``StepLR``, ``multistep`` =
``MultiStepLR``, ``exponential`` = ``ExponentialLR``, ``cosine`` =
``CosineAnnealingLR`` held after ``T_max``, ``cosine_warm_restarts`` =
``CosineAnnealingWarmRestarts``, ``polynomial`` = ``PolynomialLR``, ``linear_warmup``
= ``LinearLR`` with ``end_factor=1``, ``join`` = ``SequentialLR``.

>>> from layerwise.policies import schedules
>>> warm_cosine = schedules.join(
...     [schedules.linear_warmup(10), schedules.cosine(90, floor=0.1)], boundaries=[10]
... )
>>> [round(warm_cosine(t), 4) for t in (0, 5, 10, 55, 100, 1000)]
[0.0, 0.5, 1.0, 0.55, 0.1, 0.1]
"""

from __future__ import annotations

from collections.abc import Sequence

from layerwise.policies.schedule_base import Schedule, from_spec, registered
from layerwise.policies.schedule_kinds import (
    Constant,
    Cosine,
    CosineWarmRestarts,
    Exponential,
    Join,
    LinearWarmup,
    MultiStep,
    Polynomial,
    Step,
)

__all__ = [
    "Schedule",
    "constant",
    "cosine",
    "cosine_warm_restarts",
    "exponential",
    "from_spec",
    "join",
    "linear_warmup",
    "multistep",
    "polynomial",
    "registered",
    "step",
]


def constant(value: float = 1.0) -> Constant:
    """``f(t) = value`` for every step; ``value > 0``.

    >>> constant(0.5)(1000)
    0.5
    """
    return Constant(value)


def linear_warmup(steps: int, init: float = 0.0) -> LinearWarmup:
    """Linear ramp from ``init`` to 1 over ``steps`` steps, then 1.

    ``f(t) = init + (1 - init) * min(t, steps) / steps``, ``steps >= 1``,
    ``0 <= init <= 1``. Equals torch's ``LinearLR(start_factor=init, end_factor=1,
    total_iters=steps)`` (which also requires ``init > 0``).

    >>> [linear_warmup(4)(t) for t in range(6)]
    [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    """
    return LinearWarmup(steps, init)


def step(step_size: int, gamma: float = 0.1) -> Step:
    """Multiply by ``gamma`` every ``step_size`` steps: ``f(t) = gamma ** (t // step_size)``.

    ``step_size >= 1``, ``0 < gamma <= 1``.

    >>> [step(2, gamma=0.5)(t) for t in range(5)]
    [1.0, 1.0, 0.5, 0.5, 0.25]
    """
    return Step(step_size, gamma)


def multistep(milestones: Sequence[int], gamma: float = 0.1) -> MultiStep:
    """Multiply by ``gamma`` at each milestone: ``f(t) = gamma ** #{m in milestones: m <= t}``.

    ``milestones``: strictly increasing integers >= 1 (at least one); ``0 < gamma <= 1``.

    >>> [multistep([1, 3], gamma=0.5)(t) for t in range(4)]
    [1.0, 0.5, 0.5, 0.25]
    """
    return MultiStep(milestones, gamma)


def exponential(gamma: float) -> Exponential:
    """Multiply by ``gamma`` every step: ``f(t) = gamma ** t``, ``0 < gamma <= 1``.

    >>> exponential(0.5)(3)
    0.125
    """
    return Exponential(gamma)


def cosine(total_steps: int, floor: float = 0.0) -> Cosine:
    """Half-cosine from 1 down to ``floor`` over ``total_steps`` steps, then ``floor``.

    ``f(t) = floor + (1 - floor) * (1 + cos(pi * min(t, T) / T)) / 2`` with
    ``T = total_steps >= 1`` and ``0 <= floor <= 1`` (a fraction of the base rate).
    Loshchilov & Hutter, "SGDR", ICLR 2017 (without restarts; torch's
    ``CosineAnnealingLR`` closed form with ``eta_min = floor * base_lr`` up to ``T``).

    >>> cosine(10, floor=0.2)(5), cosine(10, floor=0.2)(99)
    (0.6000000000000001, 0.2)
    """
    return Cosine(total_steps, floor)


def cosine_warm_restarts(
    period: int, period_mult: int = 1, decay: float = 1.0, floor: float = 0.0
) -> CosineWarmRestarts:
    """Cosine annealing restarted at the end of each cycle (SGDR), with a decaying peak.

    Cycle ``i = 0, 1, ...`` lasts ``T_i = period * period_mult ** i`` steps; at
    ``s`` steps into cycle ``i`` the factor is
    ``floor + (peak_i - floor) * (1 + cos(pi * s / T_i)) / 2`` with
    ``peak_i = max(decay ** i, floor)``. ``period >= 1``, integer ``period_mult >= 1``,
    ``0 < decay <= 1``, ``0 <= floor <= 1``. No horizon: it restarts forever. With
    ``decay = 1`` it is torch's ``CosineAnnealingWarmRestarts(T_0=period,
    T_mult=period_mult, eta_min=floor * base_lr)``. Loshchilov & Hutter, ICLR 2017.

    >>> s = cosine_warm_restarts(2, period_mult=2, decay=0.5)
    >>> [round(s(t), 3) for t in range(7)]  # cycles [0, 2), [2, 6), [6, 14), ...
    [1.0, 0.5, 0.5, 0.427, 0.25, 0.073, 0.25]
    """
    return CosineWarmRestarts(period, period_mult, decay, floor)


def polynomial(total_steps: int, power: float = 1.0, floor: float = 0.0) -> Polynomial:
    """Polynomial decay from 1 to ``floor`` over ``total_steps`` steps, then ``floor``.

    ``f(t) = floor + (1 - floor) * (1 - min(t, T) / T) ** power``, ``T >= 1``,
    ``power > 0``, ``0 <= floor <= 1``. With ``floor = 0`` it is torch's
    ``PolynomialLR(total_iters=T, power=power)``; ``power = 1`` is linear decay.

    >>> [polynomial(4, power=2.0)(t) for t in range(6)]
    [1.0, 0.5625, 0.25, 0.0625, 0.0, 0.0]
    """
    return Polynomial(total_steps, power, floor)


def join(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Join:
    """Run ``schedules[i]`` between boundaries, restarting the step at each boundary.

    With ``b_0 = 0`` and ``b_i = boundaries[i-1]``, for ``b_i <= t < b_{i+1}`` the
    factor is ``schedules[i](t - b_i)`` (``optax.join_schedules``; torch's
    ``SequentialLR``). ``boundaries`` are strictly increasing integers >= 1, one fewer
    than ``schedules``. Joins nest.

    >>> s = join([constant(0.1), exponential(0.5)], boundaries=[2])
    >>> [s(t) for t in range(5)]
    [0.1, 0.1, 1.0, 0.5, 0.25]
    """
    return Join(schedules, boundaries)
