"""The sampled GGN trace is unbiased and its standard error is calibrated, with both label
samplers.

Over 200 seeds with K = 32 label samples per batch, on per-example gradients (the MLP), on
the batch function under BatchNorm in training mode, and on a causal language model with
ignored tokens: the mean estimate is within 4 of its own standard errors (over the seeds) of
the exact block trace, and the z-scores (estimate − exact) / stderr have mean ~0 and
standard deviation ~1. A group whose importance-sampled terms do not vary (the MLP's output
layer: its Jacobian is isotropic in the outputs, and every importance-sampled cotangent has
the same norm) must equal the exact trace to rounding instead.

Tolerances: the mean of 200 z-scores has a sampling spread of 1/sqrt(200) ≈ 0.07, and a
studentised mean of a right-skewed sum of squares is biased low (its standard error grows
with the draws that raise it) by about 0.1-0.25 at K = 32, so |mean| < 0.35. The t-law of 31
degrees of freedom has standard deviation 1.03, and the terms are skewed, heavy-tailed
quadratic forms (under BatchNorm, of the whole batch), so that one seed in 200 can move the
standard deviation of the z-scores by 0.2 (measured: 1.24 at K = 32 and 1.06 at K = 128 for
the BatchNorm layer's group): |std − 1| < 0.3. 95% intervals cover between 88% and 99% of
the seeds (too wide an interval fails the upper bound).
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


@pytest.mark.parametrize(
    ("make", "sampler"),
    [(mlp, "importance"), (mlp, "predictive"), (batchnorm_train, "importance"),
     (batchnorm_train, "predictive"), (tied_lm, "importance")],
    ids=lambda v: getattr(v, "__name__", v),
)  # fmt: skip
def test_sampled_ggn_is_unbiased_with_calibrated_stderr(make, sampler):
    case = make()
    groups = default_groups(case.model)
    exact = ggn_block_traces(case, groups)
    reports = [
        estimate(
            case.model,
            case.loss_object,
            case.batch,
            quantities=["ggn_trace"],
            ggn_samples=SAMPLES,
            ggn_sampler=sampler,
            seed=seed,
        )
        for seed in range(SEEDS)
    ]
    # BatchNorm zeroes its input layer's bias; a constant-norm group is exact to rounding
    names = [g for g in groups if exact[g] > 1e-10]
    steady = [g for g in names if reports[0][g].ggn_trace_stderr < 1e-10 * exact[g]]
    for g in steady:
        assert sampler == "importance" and g == "2"  # only the MLP's output layer
        assert all(r[g].ggn_trace == pytest.approx(exact[g], rel=1e-10) for r in reports)
    names = [g for g in names if g not in steady]
    truth = torch.tensor([exact[g] for g in names], dtype=torch.float64)
    means = torch.tensor([[r[g].ggn_trace for g in names] for r in reports], dtype=torch.float64)
    stderrs = torch.tensor(
        [[r[g].ggn_trace_stderr for g in names] for r in reports], dtype=torch.float64
    )
    spread = means.std(0) / math.sqrt(SEEDS)
    assert ((means.mean(0) - truth).abs() < 4 * spread).all(), (means.mean(0), truth)
    z = (means - truth) / stderrs
    assert (z.mean(0).abs() < 0.35).all(), z.mean(0)
    assert ((z.std(0) - 1).abs() < 0.3).all(), z.std(0)
    coverage = (z.abs() < 1.96).double().mean(0)
    assert ((coverage >= 0.88) & (coverage <= 0.99)).all(), coverage


@pytest.mark.parametrize("sampler", ["importance", "predictive"])
def test_stderr_shrinks_like_one_over_sqrt_samples(sampler):
    case = mlp()
    small, large = (
        estimate(case.model, case.loss_object, case.batch, quantities=["ggn_trace"],
                 ggn_samples=k, ggn_sampler=sampler, seed=3)
        for k in (16, 256)
    )  # fmt: skip
    for g in small.names:
        if sampler == "importance" and g == "2":  # the output layer: every term the same
            assert small[g].ggn_trace_stderr < 1e-12 * small[g].ggn_trace
            continue
        ratio = small[g].ggn_trace_stderr / large[g].ggn_trace_stderr
        assert 2.5 < ratio < 6.5, (g, ratio)  # sqrt(256/16) = 4


@pytest.mark.parametrize("sampler", ["importance", "predictive"])
def test_one_label_set_has_the_stderr_of_the_per_example_spread(sampler):
    """With K = 1 the standard error comes from the spread of the per-example terms
    ‖a_i,g‖² (``ggn.py``): over batches of 32 drawn from a population of 2000 examples,
    each with its own seed, the z-scores against the population's exact GGN trace (data and
    labels both random) have mean ~0, standard deviation ~1 and 95% coverage (tolerances as
    above: 200 seeds; B = 32 terms, skewed, so a studentised mean biased low by ~0.1-0.2).
    Given one batch (labels alone random) it also counts the spread of the examples' own
    traces, so it never understates the label noise: z-scores against the batch's exact
    trace have standard deviation <= 1 (measured 0.45-0.73) and coverage >= 95%."""
    case = mlp()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (2000,), generator=gen)

    def traces(report, names):
        return torch.tensor([report[g].ggn_trace for g in names], dtype=torch.float64)

    population = estimate(case.model, case.loss_object, (x, y), quantities=["ggn_trace"],
                          ggn="exact")  # fmt: skip
    names = population.names
    truth = traces(population, names)
    z, given = [], []
    for seed in range(SEEDS):
        rows = torch.randint(0, 2000, (32,), generator=torch.Generator().manual_seed(10**4 + seed))
        batch = (x[rows], y[rows])
        report = estimate(case.model, case.loss_object, batch, quantities=["ggn_trace"],
                          ggn_samples=1, ggn_sampler=sampler, seed=seed)  # fmt: skip
        stderr = torch.tensor([report[g].ggn_trace_stderr for g in names], dtype=torch.float64)
        assert (stderr > 0).all()
        z.append((traces(report, names) - truth) / stderr)
        if seed < 60:
            exact = estimate(case.model, case.loss_object, batch, quantities=["ggn_trace"],
                             ggn="exact")  # fmt: skip
            given.append((traces(report, names) - traces(exact, names)) / stderr)
    z, given = torch.stack(z), torch.stack(given)
    assert (z.mean(0).abs() < 0.35).all(), z.mean(0)
    assert ((z.std(0) - 1).abs() < 0.3).all(), z.std(0)
    coverage = (z.abs() < 1.96).double().mean(0)
    assert ((coverage >= 0.88) & (coverage <= 0.99)).all(), coverage
    assert (given.std(0) <= 1).all(), given.std(0)
    assert ((given.abs() < 1.96).double().mean(0) >= 0.95).all()


def test_one_sample_has_no_stderr_and_a_parameter_moving_no_output_has_no_ggn():
    """Under BatchNorm in training mode (one term per label set: no per-example spread)
    a single label set has no standard error."""
    case = batchnorm_train()
    report = estimate(case.model, case.loss_object, case.batch, quantities=["ggn_trace"],
                      ggn_samples=1)  # fmt: skip
    assert all(math.isnan(e.ggn_trace_stderr) for e in report)
    report = estimate(case.model, case.loss_object, case.batch, quantities=["ggn_trace"],
                      groups={"bias": ["0.bias"]}, ggn_samples=4)  # fmt: skip
    # BatchNorm subtracts the batch mean: the bias before it moves no output
    assert report["bias"].ggn_trace == pytest.approx(0.0, abs=1e-25)
