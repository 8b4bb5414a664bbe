"""The family of paired comparisons (comparisons.csv) against hand-worked values, scipy and
numpy: the sign-flip test, censored steps, Holm over the family, power and MDE, costs."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from layerwise.experiments.paired_comparisons import COLUMNS, paired_comparisons
from layerwise.experiments.power import minimum_detectable_effect, paired_power, seeds_needed
from layerwise.experiments.statistics import (
    censored_differences,
    holm,
    sign_flip_floor,
    sign_flip_test,
)


def test_sign_flip_by_hand():
    # d = [1, 2, 3]: |mean| of the 8 sign patterns: 2 (twice), 4/3 (twice: -1+2+3, 1-2-3),
    # 2/3 (twice: 1-2+3...), 0 (twice: -1-2+3, 1+2-3); only +++ and --- reach 2: p = 2/8
    assert sign_flip_test([1.0, 2.0, 3.0]).p_value == 0.25
    # d = [1, -1, 2, 0.5]: mean 0.625; patterns with |sum| >= 2.5 counted by brute force
    d = np.array([1.0, -1.0, 2.0, 0.5])
    count = sum(
        abs(np.dot(s, d)) >= abs(d.sum()) - 1e-12 for s in itertools.product([-1, 1], repeat=4)
    )
    assert sign_flip_test(d).p_value == count / 16
    assert sign_flip_floor(5) == 2 / 32 and sign_flip_floor(6) == 2 / 64


def test_sign_flip_matches_scipy_permutation_test():
    rng = np.random.default_rng(3)
    d = rng.normal(0.4, 1.0, size=7)
    ours = sign_flip_test(d).p_value
    theirs = stats.permutation_test(
        (d,), np.mean, permutation_type="samples", alternative="two-sided", n_resamples=math.inf
    ).pvalue
    assert ours == pytest.approx(theirs, abs=1e-12)


def test_sign_flip_monte_carlo_is_seeded_and_close():
    d = np.linspace(-0.5, 1.5, 20)  # 2**20 patterns: drawn
    a, b = sign_flip_test(d, seed=1), sign_flip_test(d, seed=1)
    assert a == b
    exact = stats.permutation_test(
        (d,), np.mean, permutation_type="samples", n_resamples=200_000, random_state=0
    ).pvalue
    assert a.p_value == pytest.approx(exact, abs=0.01)


def test_censored_differences_cap_at_the_budget():
    d, cp, cb = censored_differences([100, math.inf, math.inf, 400], [300, 200, math.inf, 500], 500)
    assert d.tolist() == [-200.0, 300.0, 0.0, -100.0]
    assert (cp, cb) == (2, 1)
    with pytest.raises(ValueError, match="pair up"):
        censored_differences([1], [1, 2], 10)
    with pytest.raises(ValueError, match="budget"):
        censored_differences([1], [1], math.inf)


def test_holm_by_hand_over_a_family():
    # sorted 0.001, 0.01, 0.02, 0.04 x 4, 3, 2, 1 = 0.004, 0.03, 0.04, 0.04 (monotone)
    assert holm([0.04, 0.001, 0.02, 0.01]) == [0.04, 0.004, 0.04, 0.03]
    adjusted = holm([0.5, math.nan, 0.01])  # nan (an untested row) is not in the family
    assert adjusted[0] == 0.5 and math.isnan(adjusted[1]) and adjusted[2] == 0.02


def test_power_against_noncentral_t_by_hand():
    # n = 8, sd 2, delta 1.5: nc = 1.5 sqrt 8 / 2, c = t_{.975, 7}
    nc, c = 1.5 * math.sqrt(8) / 2, stats.t.ppf(0.975, 7)
    expected = stats.nct.sf(c, 7, nc) + stats.nct.cdf(-c, 7, nc)
    assert paired_power(1.5, 2.0, 8) == pytest.approx(expected, rel=1e-12)
    mde = minimum_detectable_effect(2.0, 8)
    assert paired_power(mde, 2.0, 8) == pytest.approx(0.8, abs=1e-8)
    # the large-n normal approximation (z_.975 + z_.8) sd / sqrt(n) is close for n = 200
    normal = (stats.norm.ppf(0.975) + stats.norm.ppf(0.8)) * 2.0 / math.sqrt(200)
    assert minimum_detectable_effect(2.0, 200) == pytest.approx(normal, rel=0.01)
    assert minimum_detectable_effect(1.0, 1) == math.inf
    assert minimum_detectable_effect(0.0, 5) == 0.0


def test_seeds_needed_is_the_first_n_with_enough_power():
    n = seeds_needed(0.01, 0.015)
    assert paired_power(0.01, 0.015, n) >= 0.8 > paired_power(0.01, 0.015, n - 1)
    assert seeds_needed(1e-6, 1.0, max_n=50) is None
    with pytest.raises(ValueError, match="effect"):
        seeds_needed(0.0, 1.0)


def test_power_by_simulation():
    rng = np.random.default_rng(0)
    n, sd = 6, 1.0
    mde = minimum_detectable_effect(sd, n)
    d = rng.normal(mde, sd, size=(20_000, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    rejected = np.mean(np.abs(t) > stats.t.ppf(0.975, n - 1))
    assert rejected == pytest.approx(0.8, abs=0.015)


def _finals(rows):
    base = {"setting": "default", "budget_steps": 500, "metric": "accuracy", "status": "ok"}
    return pd.DataFrame([{**base, **r} for r in rows])


def _runs(policy, metrics, losses, steps, passes=500, est=0):
    return [
        {
            "task": "toy",
            "policy": policy,
            "seed": s,
            "test_metric": m,
            "test_loss": v,
            "steps_to_target": t,
            "passes_train": 500,
            "passes_estimation": est,
            "train_time": 10.0,
            "estimation_time": 2.0 if est else 0.0,
        }
        for s, (m, v, t) in enumerate(zip(metrics, losses, steps, strict=True))
    ]


def test_family_rows_by_hand():
    steps = [200, 300, 400, math.inf]
    uniform = _runs("uniform", [0.80, 0.82, 0.84, 0.86], [0.5, 0.5, 0.5, 0.5], steps)
    better = _runs(
        "better", [0.83, 0.85, 0.87, 0.89], [0.4, 0.45, 0.4, 0.45], [100, 200, 300, 400], est=250
    )
    info = {"toy": {"data": {"sizes": {"test": 200}}, "budget": {"eval_every": 100}}}
    table = paired_comparisons(_finals(uniform + better), info)
    assert list(table.columns) == COLUMNS
    rows = table.set_index("metric")
    m = rows.loc["final_metric"]
    assert m["n"] == 4 and m["delta"] == pytest.approx(0.03)  # a constant +3 pp
    assert m["p"] < 1e-9 and m["mde"] < 1e-9  # no spread (to rounding): any effect is seen
    assert m["resolution"] == 1 / 200 and not m["resolution_warning"]
    loss = rows.loc["final_loss"]
    d = np.array([-0.1, -0.05, -0.1, -0.05])
    assert loss["delta"] == pytest.approx(d.mean())
    assert loss["p"] == pytest.approx(stats.ttest_rel(d, np.zeros(4)).pvalue, rel=1e-10)
    assert loss["p_sign_flip"] == 2 / 16
    assert loss["mde"] == pytest.approx(minimum_detectable_effect(float(d.std(ddof=1)), 4))
    assert loss["seeds_for_effect"] == seeds_needed(0.05 * 0.5, float(d.std(ddof=1)))
    steps = rows.loc["steps_to_target"]
    # capped at 500: [100-200, 200-300, 300-400, 400-500] = -100 each
    assert steps["delta"] == -100 and steps["censored_baseline"] == 1
    assert steps["test"] == "sign-flip" and steps["p"] == 2 / 16
    assert steps["mde"] == math.inf, "2/2**4 > 0.05: no exact test can reach alpha"
    # Holm over the family of three tests
    assert list(table["p_holm"]) == holm(list(table["p"]))
    assert m["verdict"] == "better" and loss["verdict"] == "better"
    assert steps["verdict"] == "indistinguishable"
    # cost: 500 + 250 passes, half the seconds' fifth in estimation
    assert m["passes"] == 750 and m["passes_ratio"] == 1.5
    assert m["estimation_share"] == pytest.approx(250 / 750)
    assert m["estimation_share_s"] == pytest.approx(0.2)


def test_family_resolution_warning_and_seeded_ci():
    uniform = _runs("uniform", [0.80, 0.81, 0.80], [0.5] * 3, [100] * 3)
    tiny = _runs("tiny", [0.805, 0.81, 0.805], [0.5] * 3, [100] * 3)
    info = {"toy": {"data": {"sizes": {"test": 100}}, "budget": {"eval_every": 50}}}
    first = paired_comparisons(_finals(uniform + tiny), info)
    again = paired_comparisons(_finals(uniform + tiny), info)
    pd.testing.assert_frame_equal(first, again)
    row = first.set_index("metric").loc["final_metric"]
    assert row["resolution"] == 0.01 and row["resolution_warning"]
    assert row["delta"] == pytest.approx(0.00333333, abs=1e-6)


def test_mde_below_the_resolution_says_so():
    from types import SimpleNamespace

    from layerwise.experiments.report_family import mde_text

    row = SimpleNamespace(metric="final_metric", mde=0.0, resolution=1 / 360)
    assert mde_text(row) == "below the resolution, 0.28 pp"
    row = SimpleNamespace(metric="final_metric", mde=0.02, resolution=1 / 360)
    assert mde_text(row) == "2.00 pp"
    assert mde_text(SimpleNamespace(metric="final_loss", mde=0.1, resolution=math.nan)) == "0.1000"
