"""Gradient-noise estimators are unbiased on data with a known gradient covariance.

Model: loss ℓ_i(θ) = ½‖θ − ξ_i‖² with ξ_i ~ N(μ, C), so the per-example gradient is
g_i = θ − ξ_i: covariance Σ = C and mean G = θ − μ are known exactly. Averaged over many
small independent batches, tr(Σ̂_g) and the bias-corrected ‖G_g‖² (‖Ĝ_g‖² − tr(Σ̂_g)/B)
hit the truth within four standard errors of the average, while the uncorrected versions
(1/B instead of 1/(B−1), the plug-in ‖Ĝ_g‖²) are rejected by the same test; the
per-example standard errors match the spread they describe. (``variance="two_batch"``
equals the micro-batch estimate when there is no BatchNorm, which
``test_gradient_noise_matches_per_example_loop`` checks; its pure function is checked on
exact expectations here.)
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

from layerwise.sensitivity import estimate, two_batch_noise

DT = torch.float64
DRAWS = 150
BATCH = {"per_example": 4, "micro_batch": 8}  # 3 degrees of freedom each: a strong test
GROUPS = {"a": ["a"], "b": ["b"]}


class Centre(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=DT))
        self.b = nn.Parameter(torch.tensor([1.0, 0.0], dtype=DT))


def half_squared_distance(model, xi):
    theta = torch.cat([model.a, model.b])
    return 0.5 * (theta - xi).square().sum(1).mean()


def _setting():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(5, generator=g, dtype=DT)
    chol = torch.tril(torch.randn(5, 5, generator=g, dtype=DT)) + 2 * torch.eye(5, dtype=DT)
    cov = chol @ chol.T
    model = Centre()
    with torch.no_grad():  # a mean gradient G = θ − μ small against the noise
        model.a.copy_(mu[:3] + torch.tensor([0.5, -0.5, 0.3], dtype=DT))
        model.b.copy_(mu[3:] + torch.tensor([0.4, -0.2], dtype=DT))
    theta = torch.cat([model.a, model.b]).detach()
    truth = {
        "a": (cov[:3, :3].trace().item(), (theta - mu)[:3].square().sum().item()),
        "b": (cov[3:, 3:].trace().item(), (theta - mu)[3:].square().sum().item()),
    }
    return model, mu, chol, truth, g


@functools.cache
def _draws(method):
    model, mu, chol, truth, g = _setting()
    B = BATCH[method]
    rows = {k: [] for k in ("trace", "signal", "stderr")}
    for _ in range(DRAWS):
        xi = mu + torch.randn(B, 5, generator=g, dtype=DT) @ chol.T
        r = estimate(
            model, half_squared_distance, xi, groups=GROUPS, variance=method,
            quantities=["grad_norm", "grad_variance"], micro_batches=4,
        )  # fmt: skip
        trace = [r[k].grad_variance * r[k].num_params for k in GROUPS]
        rows["trace"].append(trace)
        rows["signal"].append(
            [r[k].grad_norm ** 2 - t / B for k, t in zip(GROUPS, trace, strict=True)]
        )
        rows["stderr"].append([r[k].grad_variance_stderr * r[k].num_params for k in GROUPS])
    return {k: torch.tensor(v, dtype=DT) for k, v in rows.items()}, truth


def _z(values, target):
    return (values.mean().item() - target) / (values.std().item() / math.sqrt(DRAWS))


@pytest.mark.parametrize("method", ["per_example", "micro_batch"])
def test_trace_sigma_and_signal_are_unbiased_and_uncorrected_ones_are_not(method):
    rows, truth = _draws(method)
    b, m = BATCH[method], 4  # examples, samples (examples or micro-batches) per batch
    for i, g in enumerate(GROUPS):
        trace, signal = rows["trace"][:, i], rows["signal"][:, i]
        assert abs(_z(trace, truth[g][0])) < 4, g
        assert abs(_z(signal, truth[g][1])) < 4, g
        assert abs(_z(trace * (m - 1) / m, truth[g][0])) > 4, g  # 1/M instead of 1/(M-1)
        if method == "per_example":
            assert abs(_z(signal + trace / b, truth[g][1])) > 4, g  # plug-in ‖Ĝ‖²


def test_per_example_stderr_matches_the_spread_of_the_estimates():
    rows, _ = _draws("per_example")
    reported = rows["stderr"].square().mean(0).sqrt()
    actual = rows["trace"].std(0)
    ratio = reported / actual
    assert ((ratio > 0.7) & (ratio < 1.4)).all(), ratio


def test_two_batch_noise_recovers_known_quantities_from_exact_expectations():
    # E‖G_b‖² = ‖G‖² + tr(Σ)/b exactly: the estimator inverts it
    g2, tr = 2.5, 40.0
    out = two_batch_noise({"fc": g2 + tr / 4}, {"fc": g2 + tr / 64}, b_small=4, b_big=64)
    assert out["fc"].trace_sigma == pytest.approx(tr)
    assert out["fc"].grad_sq_norm == pytest.approx(g2)
    tensors = two_batch_noise(
        torch.tensor([g2 + tr / 4, 1.0 + 2.0 / 4]),
        torch.tensor([g2 + tr / 64, 1.0 + 2.0 / 64]),
        4,
        64,
    )
    assert torch.allclose(tensors.trace_sigma, torch.tensor([tr, 2.0]))
    assert torch.allclose(tensors.grad_sq_norm, torch.tensor([g2, 1.0]))
    trace_sigma, grad_sq_norm = two_batch_noise(3.0, 1.5, 2, 8)  # floats, unpacks as a pair
    assert (trace_sigma, grad_sq_norm) == (4.0, 1.0)
