"""Statistics of the Hutchinson estimator on matrices with known traces and variances.

Over many seeds: the error of the mean shrinks like 1/sqrt(K) with exactly the variance the
theory predicts (Rademacher: 2(‖A‖_F² − Σ A_ii²); Gaussian: 2‖A‖_F²), the reported standard
errors are calibrated (z-scores roughly standard normal), shared and isolated probes are both
unbiased with isolated ones no noisier, and a diagonal matrix is exact with one probe.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from layerwise.sensitivity import estimate, hutchinson_samples, make_generator, trace_estimate

SEEDS = 300
DT = torch.float64


def _matrix(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=DT)
    return (a + a.T) / 2 + torch.diag(torch.linspace(0.5, 3.0, n, dtype=DT))


def _terms(a, split, *, probes, seed, distribution="rademacher", isolated=False, chunk=8):
    """Hutchinson terms per group for the quadratic form of ``a`` over blocks ``split``."""
    sizes = [split, a.shape[0] - split]
    like = {"x": torch.zeros(split, dtype=DT), "y": torch.zeros(sizes[1], dtype=DT)}
    gen = make_generator("cpu", seed)
    if not isolated:

        def product(v):
            hv = torch.cat([v["x"], v["y"]], 1) @ a
            return {"x": hv[:, :split], "y": hv[:, split:]}

        return hutchinson_samples(
            product, like, [0, 1], 2, budget=probes, chunk_size=chunk, generator=gen,
            distribution=distribution,
        )  # fmt: skip
    out = []
    for name, block in (("x", a[:split, :split]), ("y", a[split:, split:])):
        out.append(
            hutchinson_samples(
                lambda v, b=block, n=name: {n: v[n] @ b},
                {name: like[name]},
                [0],
                1,
                budget=probes,
                chunk_size=chunk,
                generator=gen,
                distribution=distribution,
            )[:, 0]
        )
    return torch.stack(out, 1)


def _estimates(a, split, probes, **kw):
    means, stderrs = [], []
    for seed in range(SEEDS):
        m, s = trace_estimate(_terms(a, split, probes=probes, seed=seed, **kw))
        means.append(m)
        stderrs.append(s)
    return torch.stack(means), torch.stack(stderrs)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_error_shrinks_like_one_over_sqrt_k_with_the_predicted_variance(distribution):
    a = _matrix()
    frob, diag = a.square().sum().item(), a.diagonal().square().sum().item()
    per_term = 2 * (frob - diag) if distribution == "rademacher" else 2 * frob
    for probes in (4, 16, 64):
        means, _ = _estimates(a, a.shape[0], probes, distribution=distribution)
        rmse = (means[:, 0] - a.trace()).square().mean().sqrt().item()
        predicted = math.sqrt(per_term / probes)
        assert rmse == pytest.approx(predicted, rel=0.15), (probes, rmse, predicted)


def test_reported_stderr_is_calibrated():
    a = _matrix(seed=1)
    means, stderrs = _estimates(a, 5, 32)
    truth = torch.stack([a[:5, :5].trace(), a[5:, 5:].trace()])
    z = (means - truth) / stderrs
    assert z.mean(0).abs().max() < 4 / math.sqrt(SEEDS)
    assert ((z.std(0) - 1).abs() < 0.15).all(), z.std(0)
    assert ((z.abs() < 1.96).double().mean(0) > 0.9).all()


@pytest.mark.parametrize("isolated", [False, True], ids=["shared", "isolated"])
def test_shared_and_isolated_probes_are_unbiased(isolated):
    a = _matrix(seed=2)
    means, _ = _estimates(a, 5, 8, isolated=isolated)
    truth = torch.stack([a[:5, :5].trace(), a[5:, 5:].trace()])
    spread = means.std(0) / math.sqrt(SEEDS)
    assert ((means.mean(0) - truth).abs() < 4 * spread).all()


def test_isolated_probes_have_no_cross_block_variance():
    a = _matrix(seed=3)
    shared, _ = _estimates(a, 5, 8)
    isolated, _ = _estimates(a, 5, 8, isolated=True)
    assert (isolated.var(0) < shared.var(0)).all()
    # exact per-term variance of the isolated estimator of block x: 2(‖A_xx‖_F² − Σ diag²)
    block = a[:5, :5]
    predicted = 2 * (block.square().sum() - block.diagonal().square().sum()) / 8
    assert isolated[:, 0].var().item() == pytest.approx(predicted.item(), rel=0.25)


def test_diagonal_quadratic_is_exact_with_one_rademacher_probe():
    class Quadratic(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=DT))
            self.b = nn.Parameter(torch.tensor([3.0, 4.0], dtype=DT))

    curv = {"a": torch.tensor([2.0, 3.0, 5.0], dtype=DT), "b": torch.tensor([7.0, -1.0], dtype=DT)}

    def loss_fn(model, batch):
        return (
            0.5
            * sum((curv[n] * p.square()).sum() for n, p in model.named_parameters())
            * batch.mean()
        )

    model = Quadratic()
    ones = torch.ones(4, dtype=DT)
    groups = {"a": ["a"], "b": ["b"]}
    one = estimate(model, loss_fn, ones, groups=groups, probes=1, quantities=["hessian_trace"])
    assert one["a"].hessian_trace == 10.0 and one["b"].hessian_trace == 6.0
    assert math.isnan(one["a"].hessian_trace_stderr)  # one probe: no spread to measure
    two = estimate(model, loss_fn, ones, groups=groups, probes=2, quantities=["hessian_trace"])
    assert two["a"].hessian_trace_stderr == 0.0 and two["b"].hessian_trace == 6.0


def test_tolerance_stops_early_and_max_probes_caps_the_budget():
    a = _matrix(seed=4)
    like = {"x": torch.zeros(12, dtype=DT)}

    def product(v):
        return {"x": v["x"] @ a}

    def run(tolerance, budget):
        return hutchinson_samples(
            product, like, [0], 1, budget=budget, chunk_size=4,
            generator=make_generator("cpu", 0), tolerance=tolerance,
        ).shape[0]  # fmt: skip

    assert run(None, 40) == 40
    assert run(1e-9, 40) == 40  # never converges: the whole budget
    assert run(10.0, 40) == 4  # converged after the first chunk
    loose = run(0.2, 400)
    assert 4 < loose < 400 and loose % 4 == 0
    diag = {"x": torch.zeros(3, dtype=DT)}
    exact = hutchinson_samples(
        lambda v: {"x": v["x"] * 2.0}, diag, [0], 1, budget=64, chunk_size=2,
        generator=make_generator("cpu", 0), tolerance=1e-6,
    )  # fmt: skip
    assert exact.shape[0] == 2  # zero spread counts as converged


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_probes_drawn_into_a_workspace_are_the_fresh_draws(distribution):
    """A reused workspace changes no probe: the same seed gives the same probes, chunk
    after chunk (a smaller last chunk too), and the workspace's storage is reused."""
    from layerwise.sensitivity.probes import draw_probes

    like = {"w": torch.zeros(5, 3), "b": torch.zeros(7)}
    fresh, reused = make_generator("cpu", 11), make_generator("cpu", 11)
    workspace: dict[str, torch.Tensor] = {}
    storage = None
    for count in (4, 4, 3):
        a = draw_probes(like, count, fresh, distribution)
        b = draw_probes(like, count, reused, distribution, workspace)
        assert all(torch.equal(a[n], b[n]) and b[n].shape == (count, *like[n].shape) for n in like)
        pointers = {k: v.data_ptr() for k, v in workspace.items()}
        assert storage is None or pointers == storage
        storage = pointers
    if distribution == "rademacher":  # one byte of a 64-bit-range draw per eight signs
        bytes_ = torch.randint(0, 256, (((5 * 3 + 7) * 2 + 7) // 8,),
                               generator=make_generator("cpu", 3))  # fmt: skip
        bits = (bytes_.unsqueeze(1) >> torch.arange(8)) & 1
        signs = (bits * 2 - 1).reshape(-1).float()
        v = draw_probes(like, 2, make_generator("cpu", 3), distribution, {})
        assert torch.equal(torch.cat([v["w"].reshape(-1), v["b"].reshape(-1)]), signs[:44])
