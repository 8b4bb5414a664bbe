"""The statistics of the ablation report against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from layerwise.experiments.statistics import (
    bootstrap_ci,
    compare,
    hedges_g,
    holm,
    paired_dz,
    paired_test,
    steps_to_target,
    t_band,
    welch_test,
)

A = [1.0, 2.0, 3.0, 4.0]  # mean 2.5, sample variance 5/3
B = [2.0, 4.0, 6.0, 8.0]  # mean 5.0, sample variance 20/3


def test_welch_statistic_and_df_by_hand():
    # se^2 = (5/3)/4 + (20/3)/4 = 25/12; t = -2.5 / sqrt(25/12) = -sqrt(3)
    # df = (25/12)^2 / ((5/12)^2/3 + (5/3)^2/3) = (625/144) / (425/432) = 75/17
    result = welch_test(A, B)
    assert result.name == "welch"
    assert result.statistic == pytest.approx(-math.sqrt(3.0), rel=1e-12)
    assert result.df == pytest.approx(75.0 / 17.0, rel=1e-12)
    assert result.p_value == pytest.approx(2 * stats.t.cdf(-math.sqrt(3.0), 75.0 / 17.0), rel=1e-12)
    assert result.p_value == pytest.approx(stats.ttest_ind(A, B, equal_var=False).pvalue, rel=1e-12)


def test_paired_statistic_by_hand():
    a, b = [0.90, 0.92, 0.94], [0.89, 0.90, 0.91]
    # d = [0.01, 0.02, 0.03]: mean 0.02, sd 0.01, t = 0.02 / (0.01 / sqrt 3) = 2 sqrt 3, df 2
    result = paired_test(a, b)
    assert result.statistic == pytest.approx(2 * math.sqrt(3.0), rel=1e-9)
    assert result.df == 2
    assert result.p_value == pytest.approx(2 * stats.t.sf(2 * math.sqrt(3.0), 2), rel=1e-9)
    assert paired_dz(a, b) == pytest.approx(2.0, rel=1e-9)  # 0.02 / 0.01


def test_hedges_g_by_hand():
    # pooled variance (3 * 5/3 + 3 * 20/3) / 6 = 25/6; d = -2.5 / sqrt(25/6) = -sqrt(6)/2
    # J = 1 - 3 / (4 * 8 - 9) = 20/23
    assert hedges_g(A, B) == pytest.approx(-(20 / 23) * math.sqrt(6.0) / 2, rel=1e-12)


def test_bootstrap_of_two_values_enumerated_by_hand():
    # resample means 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4
    assert bootstrap_ci([0.0, 1.0], confidence=0.95) == (0.5, 0.0, 1.0)
    assert bootstrap_ci([0.0, 1.0], confidence=0.4) == (0.5, 0.5, 0.5)  # CDF 0.25 < 0.3
    # alpha/2 = 0.25: CDF(0) = 0.25 reaches it; 1 - alpha/2 = 0.75: CDF(0.5) = 0.75 reaches it
    assert bootstrap_ci([0.0, 1.0], confidence=0.5) == (0.5, 0.0, 0.5)


def test_bootstrap_of_three_values_enumerated_by_hand():
    # sums of 3 draws from {1,2,3}: 3..9 with counts 1,3,6,7,6,3,1 out of 27
    # CDF of the mean: 1/27, 4/27, 10/27, 17/27, 23/27, 26/27, 1
    mean, low, high = bootstrap_ci([1.0, 2.0, 3.0], confidence=0.95)
    assert (mean, low, high) == (2.0, 1.0, 3.0)  # 1/27 >= .025; 26/27 < .975
    _, low, high = bootstrap_ci([1.0, 2.0, 3.0], confidence=0.8)
    assert low == pytest.approx(4 / 3) and high == pytest.approx(8 / 3)  # 4/27 >= .1; 26/27 >= .9


def test_monte_carlo_bootstrap_converges_to_the_exact_one():
    values = [0.1, 0.5, 0.2, 0.9, 0.4, 0.3]  # 6^6 > 10,000 resamples: Monte Carlo
    _, low, high = bootstrap_ci(values, confidence=0.8, resamples=200_000, seed=1)
    rng = np.random.default_rng(2)
    means = np.asarray(values)[rng.integers(0, 6, (400_000, 6))].mean(axis=1)
    assert low == pytest.approx(np.quantile(means, 0.1, method="inverted_cdf"), abs=0.01)
    assert high == pytest.approx(np.quantile(means, 0.9, method="inverted_cdf"), abs=0.01)


def test_single_value_has_no_interval():
    mean, low, high = bootstrap_ci([0.7])
    assert mean == 0.7 and math.isnan(low) and math.isnan(high)


def test_holm_by_hand():
    # sorted 0.01*3 = .03, 0.03*2 = .06, max(.06, 0.04*1) = .06
    assert holm([0.01, 0.04, 0.03]) == [0.03, 0.06, 0.06]
    assert holm([0.5, float("nan")])[0] == 0.5
    assert holm([0.4, 0.3]) == [0.6, 0.6]


def test_degenerate_tests():
    assert paired_test([1, 1], [1, 1]).p_value == 1.0
    assert paired_test([2, 2], [1, 1]).p_value == 0.0
    assert welch_test([1, 1], [1, 1]).statistic == 0.0
    assert math.isnan(paired_dz([1, 2], [1, 2]))


def test_compare_paired_and_welch():
    a, b = [0.90, 0.92, 0.94], [0.89, 0.90, 0.91]
    paired = compare(a, b, paired=True)
    assert paired.delta == pytest.approx(0.02) and paired.test.name == "paired"
    assert paired.delta_low <= paired.delta <= paired.delta_high
    welch = compare(a, b, paired=False)
    assert welch.test.name == "welch" and welch.effect_size == pytest.approx(hedges_g(a, b))


def test_steps_to_target_and_band():
    assert steps_to_target([0, 10, 20], [0.1, 0.5, 0.9], 0.5) == 10
    assert steps_to_target([0, 10], [0.1, 0.2], 0.5) == math.inf
    mean, half = t_band(np.array([[1.0, 2.0], [3.0, 2.0]]))
    assert mean.tolist() == [2.0, 2.0]
    # sd = sqrt 2, n = 2: half width t_{0.975,1} * sqrt 2 / sqrt 2
    assert half[0] == pytest.approx(stats.t.ppf(0.975, 1)) and half[1] == 0.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: bootstrap_ci([], 0.95), "values needs at least 1"),
        (lambda: bootstrap_ci([1.0, math.nan]), "values must be finite"),
        (lambda: bootstrap_ci([1.0, 2.0], confidence=1.5), "confidence must be in"),
        (lambda: bootstrap_ci([1.0, 2.0], resamples=5), "resamples must be"),
        (lambda: welch_test([1.0], [1.0, 2.0]), "a needs at least 2"),
        (lambda: paired_test([1.0, 2.0], [1.0, 2.0, 3.0]), "must pair up"),
        (lambda: holm([1.5]), "p_values must lie in"),
        (lambda: steps_to_target([1, 2], [0.1], 0.5), "differ in length"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_summarise_leaves_out_a_non_finite_test_metric():
    """A run whose test metric is NaN is left out of the test as it is of the interval
    (it used to reach compare() and stop the whole report with 'a must be finite')."""
    import math

    import pandas as pd

    from layerwise.experiments.comparisons import summarise

    rows = []
    for policy, values in {"uniform": [0.80, 0.82, 0.84], "noise": [0.83, math.nan, 0.88]}.items():
        for seed, value in enumerate(values):
            rows.append(
                dict(task="t", setting="default", policy=policy, seed=seed, lr=0.1,
                     test_metric=value, metric="accuracy", steps_to_target=10.0,
                     train_time=1.0, fallback_events=0, status="ok")
            )  # fmt: skip
    row = summarise(pd.DataFrame(rows)).set_index("policy").loc["noise"]
    expected = welch_test([0.83, 0.88], [0.80, 0.82, 0.84])  # seeds no longer match
    assert row["n"] == 2 and row["test"] == "welch"
    assert row["p"] == pytest.approx(expected.p_value, rel=1e-12)
    assert row["delta"] == pytest.approx(0.855 - 0.82, abs=1e-12)
