"""How large an effect a paired comparison over seeds can see, and how many seeds it needs.

A comparison of a policy with the baseline over ``n`` paired seeds has per-seed
differences ``d_i`` with sample standard deviation ``s``. The two-sided paired t-test at
level ``alpha`` rejects when ``|t| > t_{1-alpha/2, n-1}``; for a true mean difference
``delta`` its power is that of the noncentral t distribution with ``n - 1`` degrees of
freedom and noncentrality ``delta sqrt(n) / s`` (Cohen 1988, ch. 2):

``power(delta) = P(T' > c) + P(T' < -c)``, ``c = t_{1-alpha/2, n-1}``.

* :func:`paired_power` is that power;
* :func:`minimum_detectable_effect` (MDE) is the smallest ``|delta|`` whose power reaches
  ``power`` (0.8 by default), in the units of ``s``: the effect this run could have
  seen. It is ``inf`` for fewer than 2 seeds and ``0`` when ``s = 0``.
* :func:`seeds_needed` is the smallest ``n`` whose power to detect ``effect`` at the
  observed ``s`` reaches ``power`` (capped at ``max_n``; ``None`` beyond it).

Both use the observed ``s`` as if it were the true standard deviation, so they are
estimates: with 3 to 5 seeds ``s`` itself is uncertain by a factor of about 2.

>>> round(minimum_detectable_effect(sd=1.0, n=10), 3)  # in units of sd: d_z = 0.996
0.996
>>> seeds_needed(effect=1.0, sd=1.0)
10
"""

from __future__ import annotations

import math

from scipy import optimize, stats

__all__ = ["minimum_detectable_effect", "paired_power", "seeds_needed"]


def _check(sd: float, n: int, alpha: float, power: float | None = None) -> None:
    if not (isinstance(sd, int | float) and math.isfinite(sd) and sd >= 0):
        raise ValueError(f"sd must be a finite number >= 0, got {sd!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    if power is not None and not 0 < power < 1:
        raise ValueError(f"power must be in (0, 1), got {power!r}")


def paired_power(delta: float, sd: float, n: int, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test at level ``alpha`` for a mean difference
    ``delta`` with difference standard deviation ``sd`` over ``n`` pairs (module docstring).

    >>> round(paired_power(0.0, 1.0, 10), 3)  # no effect: the test's size
    0.05
    """
    _check(sd, n, alpha)
    if n < 2:
        return math.nan
    if sd == 0:
        return 1.0 if delta != 0 else alpha
    df = n - 1
    c = stats.t.ppf(1 - alpha / 2, df)
    nc = abs(delta) * math.sqrt(n) / sd
    lower = stats.nct.cdf(-c, df, nc)  # scipy gives nan far out in the tail, where it is ~0
    return float(stats.nct.sf(c, df, nc) + (0.0 if math.isnan(lower) else lower))


def minimum_detectable_effect(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest ``|delta|`` the paired t-test detects with probability ``power``."""
    _check(sd, n, alpha, power)
    if n < 2:
        return math.inf
    if sd == 0:
        return 0.0
    hi = 1.0
    while paired_power(hi * sd, 1.0 * sd, n, alpha) < power:
        hi *= 2.0
        if hi > 1e6:
            return math.inf
    z = optimize.brentq(lambda k: paired_power(k, 1.0, n, alpha) - power, 0.0, hi, xtol=1e-10)
    return float(z * sd)


def seeds_needed(
    effect: float, sd: float, alpha: float = 0.05, power: float = 0.8, max_n: int = 1000
) -> int | None:
    """The smallest ``n >= 2`` whose paired t-test detects ``effect`` with probability
    ``power`` at difference standard deviation ``sd`` (``None`` when over ``max_n``)."""
    _check(sd, 2, alpha, power)
    if not (isinstance(effect, int | float) and math.isfinite(effect) and effect > 0):
        raise ValueError(f"effect must be a positive number, got {effect!r}")
    if sd == 0:
        return 2
    lo, hi = 2, 2
    while paired_power(effect, sd, hi, alpha) < power:
        lo, hi = hi, hi * 2
        if hi > max_n:
            if paired_power(effect, sd, max_n, alpha) < power:
                return None
            hi = max_n
            break
    while lo < hi:  # power grows with n: the first n that reaches it
        mid = (lo + hi) // 2
        if paired_power(effect, sd, mid, alpha) >= power:
            hi = mid
        else:
            lo = mid + 1
    return lo
