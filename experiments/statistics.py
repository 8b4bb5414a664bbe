"""Statistics for ablations over a few seeds: bootstrap intervals, tests, effect sizes.

Conventions: ``a`` is the policy, ``b`` the baseline (``uniform``); a difference is
``mean(a) - mean(b)`` in the metric's units (accuracy as a fraction). Variances are sample
variances (``ddof=1``). Intervals are two-sided at ``confidence`` (0.95 by default).

* :func:`bootstrap_ci` is the percentile bootstrap (Efron & Tibshirani 1993, ch. 13) of
  the mean. With ``n ** n <= resamples`` (n <= 5 values at the default), it enumerates
  every resample, so the interval is exact and deterministic; otherwise it draws
  ``resamples`` with a seeded generator. Either way the bounds are the smallest
  resampled means whose cumulative probability reaches ``alpha/2`` and ``1 - alpha/2``
  (the "inverted CDF" quantile).
* :func:`welch_test` is Welch's unequal-variance t-test (Welch 1947) with the
  Welch-Satterthwaite degrees of freedom; :func:`paired_test` the paired t-test on the
  per-seed differences (runs with the same seed share the initialisation and the data
  order, so pairing removes that variance).
* Effect sizes: Hedges' g (Cohen's d with the pooled SD and the small-sample correction
  ``J = 1 - 3 / (4 (n_a + n_b) - 9)``) for independent samples, ``d_z = mean(d) / sd(d)``
  for paired ones (Lakens 2013).
* :func:`sign_flip_test` is the exact paired permutation test (Fisher 1935; Pitman
  1937) of ``mean(d) == 0``: under the null each per-seed difference is as likely to have
  either sign, so the p-value is the share of the ``2**n`` sign patterns whose mean is at
  least as far from 0 as the observed one (every pattern enumerated for ``n <= 16``,
  else ``resamples`` seeded draws). It needs no normality, but its smallest p-value is
  ``2 / 2**n`` (0.0625 at 5 seeds): :func:`sign_flip_floor`.
* :func:`censored_differences` pairs times-to-event (steps to a target) that may be
  censored (``inf``: never reached within the budget): both are capped at the budget
  before subtracting. The cap is a monotone map applied alike to both policies, so a
  pair that is exchangeable under the null stays exchangeable, and the sign-flip test of
  the capped differences is exact; the mean capped difference understates a gap that
  runs past the budget (a conservative effect estimate).
* :func:`holm` adjusts p-values for a family of tests (Holm 1979).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = [
    "Comparison",
    "TestResult",
    "bootstrap_ci",
    "censored_differences",
    "compare",
    "hedges_g",
    "holm",
    "paired_dz",
    "paired_test",
    "sign_flip_floor",
    "sign_flip_test",
    "steps_to_target",
    "t_band",
    "welch_test",
]


def _array(values: Sequence[float], name: str, min_size: int = 1) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).ravel()
    if arr.size < min_size:
        raise ValueError(f"{name} needs at least {min_size} value(s), got {arr.size}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()!r}")
    return arr


def _check_confidence(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return 1.0 - confidence


def _inverted_cdf(values: np.ndarray, weights: np.ndarray, q: float) -> float:
    order = np.argsort(values, kind="stable")
    cdf = np.cumsum(weights[order]) / weights.sum()
    index = int(np.searchsorted(cdf, q - 1e-12, side="left"))
    return float(values[order][min(index, len(values) - 1)])


def bootstrap_ci(
    values: Sequence[float], confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
) -> tuple[float, float, float]:
    """(mean, lower, upper): percentile bootstrap interval of the mean of ``values``.

    One value gives ``(x, nan, nan)``: a single run says nothing about the spread.

    >>> bootstrap_ci([0.0, 1.0], confidence=0.4)  # resample means 0, .5, 1 w.p. 1/4, 1/2, 1/4
    (0.5, 0.5, 0.5)
    """
    alpha = _check_confidence(confidence)
    x = _array(values, "values")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise ValueError(f"resamples must be an integer >= 100, got {resamples!r}")
    mean = float(x.mean())
    n = x.size
    if n == 1:
        return mean, math.nan, math.nan
    if n**n <= resamples:  # exact: every resample, equally likely
        means = np.array([x[list(idx)].mean() for idx in itertools.product(range(n), repeat=n)])
    else:
        rng = np.random.default_rng(seed)
        means = x[rng.integers(0, n, size=(resamples, n))].mean(axis=1)
    weights = np.ones_like(means)
    return (
        mean,
        _inverted_cdf(means, weights, alpha / 2),
        _inverted_cdf(means, weights, 1 - alpha / 2),
    )


@dataclass(frozen=True)
class TestResult:
    """A two-sided t-test: its name, statistic, degrees of freedom and p-value."""

    __test__ = False  # not a pytest test class

    name: str
    statistic: float
    df: float
    p_value: float


def welch_test(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """Welch's t-test of ``mean(a) == mean(b)``: ``t = (ā - b̄) / sqrt(s_a²/n_a + s_b²/n_b)``.

    Two constant samples give ``t = 0, p = 1`` when equal and ``t = ±inf, p = 0`` otherwise.
    """
    x, y = _array(a, "a", 2), _array(b, "b", 2)
    va, vb = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    diff = x.mean() - y.mean()
    if va + vb == 0.0:
        return _degenerate("welch", diff, float(x.size + y.size - 2))
    t = diff / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (x.size - 1) + vb**2 / (y.size - 1))
    return TestResult("welch", float(t), float(df), float(2 * stats.t.sf(abs(t), df)))


def paired_test(a: Sequence[float], b: Sequence[float]) -> TestResult:
    """Paired t-test on ``d = a - b`` (same order = same seed): ``t = d̄ / (s_d / sqrt(n))``."""
    x, y = _array(a, "a", 2), _array(b, "b", 2)
    if x.size != y.size:
        raise ValueError(f"a and b must pair up, got {x.size} and {y.size} values")
    d = x - y
    sd = d.std(ddof=1)
    if sd == 0.0:
        return _degenerate("paired", d.mean(), float(d.size - 1))
    t = d.mean() / (sd / math.sqrt(d.size))
    df = d.size - 1
    return TestResult("paired", float(t), float(df), float(2 * stats.t.sf(abs(t), df)))


def _degenerate(name: str, diff: float, df: float) -> TestResult:
    if diff == 0.0:
        return TestResult(name, 0.0, df, 1.0)
    return TestResult(name, math.copysign(math.inf, diff), df, 0.0)


def hedges_g(a: Sequence[float], b: Sequence[float]) -> float:
    """Hedges' g: ``J (ā - b̄) / s_pooled`` (nan when both samples are constant)."""
    x, y = _array(a, "a", 2), _array(b, "b", 2)
    pooled = ((x.size - 1) * x.var(ddof=1) + (y.size - 1) * y.var(ddof=1)) / (x.size + y.size - 2)
    if pooled == 0.0:
        return math.nan
    correction = 1.0 - 3.0 / (4.0 * (x.size + y.size) - 9.0)
    return float(correction * (x.mean() - y.mean()) / math.sqrt(pooled))


def paired_dz(a: Sequence[float], b: Sequence[float]) -> float:
    """Paired effect size ``d_z = mean(a - b) / sd(a - b)`` (nan when the sd is 0)."""
    x, y = _array(a, "a", 2), _array(b, "b", 2)
    if x.size != y.size:
        raise ValueError(f"a and b must pair up, got {x.size} and {y.size} values")
    sd = (x - y).std(ddof=1)
    return math.nan if sd == 0.0 else float((x - y).mean() / sd)


@dataclass(frozen=True)
class Comparison:
    """A policy against the baseline: difference of means with its bootstrap interval
    (of the paired differences, or of the difference of independent resampled means),
    the t-test and the effect size (``d_z`` when paired, Hedges' g otherwise)."""

    delta: float
    delta_low: float
    delta_high: float
    test: TestResult
    effect_size: float
    paired: bool
    n: int


def compare(
    a: Sequence[float],
    b: Sequence[float],
    *,
    paired: bool,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> Comparison:
    """Compare policy values ``a`` with baseline values ``b`` (see :class:`Comparison`)."""
    x, y = _array(a, "a", 2), _array(b, "b", 2)
    if paired:
        test = paired_test(x, y)
        delta, low, high = bootstrap_ci(x - y, confidence, resamples, seed)
        effect = paired_dz(x, y)
    else:
        test = welch_test(x, y)
        alpha = _check_confidence(confidence)
        rng = np.random.default_rng(seed)
        da = x[rng.integers(0, x.size, (resamples, x.size))].mean(axis=1)
        db = y[rng.integers(0, y.size, (resamples, y.size))].mean(axis=1)
        w = np.ones(resamples)
        delta = float(x.mean() - y.mean())
        low = _inverted_cdf(da - db, w, alpha / 2)
        high = _inverted_cdf(da - db, w, 1 - alpha / 2)
        effect = hedges_g(x, y)
    return Comparison(delta, low, high, test, effect, paired, int(min(x.size, y.size)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (nan entries stay nan).

    >>> holm([0.01, 0.04, 0.03])
    [0.03, 0.06, 0.06]
    """
    p = np.asarray(p_values, dtype=np.float64)
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"p_values must lie in [0, 1], got {p.tolist()!r}")
    finite = np.flatnonzero(~np.isnan(p))
    m = finite.size
    adjusted = np.full(p.shape, np.nan)
    running = 0.0
    for rank, index in enumerate(finite[np.argsort(p[finite], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return [round(float(v), 12) for v in adjusted]


def sign_flip_test(
    differences: Sequence[float], resamples: int = 100_000, seed: int = 0
) -> TestResult:
    """Exact two-sided sign-flip permutation test of ``mean(d) == 0`` (module docstring).
    ``statistic`` is the observed mean; ``df`` is ``nan`` (no reference distribution).

    >>> sign_flip_test([1.0, 2.0, 3.0]).p_value  # only all-plus and all-minus are as far out
    0.25
    """
    d = _array(differences, "differences")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 100:
        raise ValueError(f"resamples must be an integer >= 100, got {resamples!r}")
    n, observed = d.size, abs(float(d.mean()))
    if observed == 0.0:
        return TestResult("sign-flip", 0.0, math.nan, 1.0)
    if n <= 16:  # every sign pattern, each with probability 2**-n
        signs = 1 - 2 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
    else:
        signs = np.random.default_rng(seed).choice([-1, 1], size=(resamples, n))
    means = np.abs(signs @ d) / n
    tolerance = 1e-12 * max(1.0, observed)
    p = float(np.mean(means >= observed - tolerance))
    return TestResult("sign-flip", float(d.mean()), math.nan, p)


def sign_flip_floor(n: int) -> float:
    """The smallest p-value the two-sided sign-flip test can give with ``n`` pairs.

    >>> sign_flip_floor(5)
    0.0625
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    return min(1.0, 2.0 / 2**n)


def censored_differences(
    a: Sequence[float], b: Sequence[float], budget: float
) -> tuple[np.ndarray, int, int]:
    """``(min(a, budget) - min(b, budget), censored in a, censored in b)`` for paired
    times ``a`` (policy) and ``b`` (baseline) where ``inf`` (or anything past ``budget``)
    means the target was never reached (module docstring).

    >>> censored_differences([100, float("inf")], [300, 200], budget=500)
    (array([-200.,  300.]), 1, 0)
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.size != y.size:
        raise ValueError(f"a and b must pair up, got {x.size} and {y.size} values")
    if not (math.isfinite(budget) and budget > 0):
        raise ValueError(f"budget must be a positive number, got {budget!r}")
    if np.any(np.isnan(x)) or np.any(np.isnan(y)) or np.any(x < 0) or np.any(y < 0):
        raise ValueError(f"times must be >= 0 or inf, got {x.tolist()!r} and {y.tolist()!r}")
    return (
        np.minimum(x, budget) - np.minimum(y, budget),
        int(np.sum(x > budget)),
        int(np.sum(y > budget)),
    )


def steps_to_target(steps: Sequence[int], values: Sequence[float], target: float) -> float:
    """The first step at which ``values`` reaches ``target`` (``inf`` if never).

    >>> steps_to_target([100, 200, 300], [0.5, 0.8, 0.9], 0.8)
    200.0
    """
    s, v = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if s.shape != v.shape:
        raise ValueError(f"steps and values differ in length: {s.size} and {v.size}")
    hit = np.flatnonzero(v >= target)
    return float(s[hit[0]]) if hit.size else math.inf


def t_band(values: np.ndarray, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Mean over seeds (axis 0) and the half-width of its t interval, per column
    (``t_{n-1} s / sqrt(n)``; zero width for a single seed; nan entries ignored)."""
    alpha = _check_confidence(confidence)
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"values must be 2-d (seeds x points), got shape {arr.shape}")
    n = np.sum(~np.isnan(arr), axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.nanmean(arr, axis=0) if arr.size else np.zeros(arr.shape[1])
        sd = np.nanstd(arr, axis=0, ddof=1) if arr.shape[0] > 1 else np.zeros(arr.shape[1])
        half = np.where(
            n > 1, stats.t.ppf(1 - alpha / 2, np.maximum(n - 1, 1)) * sd / np.sqrt(n), 0
        )
    return mean, np.nan_to_num(half)
