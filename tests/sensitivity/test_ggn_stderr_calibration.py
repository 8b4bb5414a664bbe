"""The sampled GGN trace is unbiased and its standard error is calibrated.

Over 200 seeds with K = 32 label samples per batch, on per-example gradients (the MLP), on
the batch function under BatchNorm in training mode, and on a causal language model with
ignored tokens: the mean estimate is within 4 of its own standard errors (over the seeds) of
the exact block trace, and the z-scores (estimate − exact) / stderr have mean ~0 and
standard deviation ~1. Tolerances: the mean of 200 z-scores has a sampling spread of
1/sqrt(200) ≈ 0.07, and a studentised mean of a right-skewed sum of squares is biased low
(its standard error grows with the draws that raise it) by about 0.1-0.25 at K = 32, so
|mean| < 0.35; the spread of a standard deviation of 200 draws is ≈ 0.05, and the t-law of
31 degrees of freedom has standard deviation 1.03, so |std − 1| < 0.2; 95% intervals cover at
least 88% of the seeds.
"""

from __future__ import annotations

import math

import pytest
import torch

from layerwise.sensitivity import default_groups, estimate

from .cases import batchnorm_train, mlp, tied_lm
from .reference import ggn_block_traces

SEEDS, SAMPLES = 200, 32
pytestmark = pytest.mark.filterwarnings("ignore:There is a performance drop")


@pytest.mark.parametrize("make", [mlp, batchnorm_train, tied_lm], ids=lambda f: f.__name__)
def test_sampled_ggn_is_unbiased_with_calibrated_stderr(make):
    case = make()
    groups = default_groups(case.model)
    exact = ggn_block_traces(case, groups)
    names = [g for g in groups if exact[g] > 1e-10]  # BatchNorm zeroes its input layer's bias
    truth = torch.tensor([exact[g] for g in names], dtype=torch.float64)
    means, stderrs = [], []
    for seed in range(SEEDS):
        report = estimate(
            case.model, case.loss_object, case.batch, quantities=["ggn_trace"],
            ggn_samples=SAMPLES, seed=seed,
        )  # fmt: skip
        means.append([report[g].ggn_trace for g in names])
        stderrs.append([report[g].ggn_trace_stderr for g in names])
    means = torch.tensor(means, dtype=torch.float64)
    stderrs = torch.tensor(stderrs, dtype=torch.float64)
    spread = means.std(0) / math.sqrt(SEEDS)
    assert ((means.mean(0) - truth).abs() < 4 * spread).all(), (means.mean(0), truth)
    z = (means - truth) / stderrs
    assert (z.mean(0).abs() < 0.35).all(), z.mean(0)
    assert ((z.std(0) - 1).abs() < 0.2).all(), z.std(0)
    assert ((z.abs() < 1.96).double().mean(0) >= 0.88).all()


def test_stderr_shrinks_like_one_over_sqrt_samples():
    case = mlp()
    small = estimate(case.model, case.loss_object, case.batch, quantities=["ggn_trace"],
                     ggn_samples=16, seed=3)  # fmt: skip
    large = estimate(case.model, case.loss_object, case.batch, quantities=["ggn_trace"],
                     ggn_samples=256, seed=3)  # fmt: skip
    for g in small.names:
        ratio = small[g].ggn_trace_stderr / large[g].ggn_trace_stderr
        assert 2.5 < ratio < 6.5, (g, ratio)  # sqrt(256/16) = 4


def test_one_sample_has_no_stderr_and_a_parameter_moving_no_output_has_no_ggn():
    case = batchnorm_train()
    report = estimate(case.model, case.loss_object, case.batch, quantities=["ggn_trace"],
                      ggn_samples=1)  # fmt: skip
    assert all(math.isnan(e.ggn_trace_stderr) for e in report)
    report = estimate(case.model, case.loss_object, case.batch, quantities=["ggn_trace"],
                      groups={"bias": ["0.bias"]}, ggn_samples=4)  # fmt: skip
    # BatchNorm subtracts the batch mean: the bias before it moves no output
    assert report["bias"].ggn_trace == pytest.approx(0.0, abs=1e-25)
