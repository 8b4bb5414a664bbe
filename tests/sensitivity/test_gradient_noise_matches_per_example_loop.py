"""Gradient statistics of ``estimate`` against brute force, exactly.

Per-example statistics against a Python loop of per-example ``autograd.grad``; micro-batch
and two-batch statistics (BatchNorm in training mode) against a loop over micro-batches.
"""

from __future__ import annotations

import copy
from itertools import pairwise

import pytest
import torch
from torch.func import replace_all_batch_norm_modules_

from layerwise.sensitivity import default_groups, estimate, per_example_gradients
from layerwise.sensitivity.functional import FunctionalLoss

from .cases import CASES, Case, batchnorm_train
from .reference import exact_trace_sigma, per_example_loop

PER_EXAMPLE = [c for c in CASES if c().per_example]


def _group_columns(case, groups):
    names = [n for n, _ in case.model.named_parameters()]
    sizes = [case.model.get_parameter(n).numel() for n in names]
    bounds = torch.tensor([0, *sizes]).cumsum(0).tolist()
    where = {n: torch.arange(a, b) for n, a, b in zip(names, bounds, bounds[1:], strict=False)}
    return names, {g: torch.cat([where[n] for n in m]) for g, m in groups.items()}


def _expected(samples, weights, centre, n_g):
    """Brute-force per-group quantities from gradient samples (rows) with weights."""
    m, w = samples.shape[0], weights.sum()
    mean = (weights[:, None] * samples).sum(0) / w
    dev = samples - mean
    trace = (weights * dev.square().sum(1)).sum() / (m - 1)
    d = weights * (samples - centre).square().sum(1)
    se = (m / (m - 1)) * d.std() / m**0.5
    proj = (weights * (dev @ centre) ** 2).sum() / ((m - 1) * centre.square().sum())
    return {
        "grad_norm": centre.norm().item(),
        "grad_variance": (trace / n_g).item(),
        "grad_variance_stderr": (se / n_g).item(),
        "grad_norm_stderr": (proj / w).sqrt().item(),
        "trace": trace.item(),
    }


@pytest.mark.parametrize("make", PER_EXAMPLE, ids=[c.__name__ for c in PER_EXAMPLE])
def test_per_example_statistics_equal_the_autograd_loop(make):
    case = make()
    groups = default_groups(case.model)
    names, cols = _group_columns(case, groups)
    grads = per_example_loop(case, names)  # (B, P)
    b = grads.shape[0]
    report = estimate(
        case.model, case.loss_fn, case.batch, quantities=["grad_norm", "grad_variance"],
        variance="per_example", example_chunk_size=4,
    )  # fmt: skip
    assert report.settings["variance"] == "per_example"
    for g, idx in cols.items():
        sub = grads[:, idx]
        exp = _expected(sub, torch.ones(b, dtype=sub.dtype), sub.mean(0), idx.numel())
        est = report[g]
        for key in ("grad_norm", "grad_variance", "grad_variance_stderr", "grad_norm_stderr"):
            assert getattr(est, key) == pytest.approx(exp[key], rel=1e-8, abs=1e-14), (g, key)
        signal = b * exp["grad_norm"] ** 2 - exp["trace"]
        expected_nts = exp["trace"] / signal if signal > 0 else float("inf")
        assert est.noise_to_signal == pytest.approx(expected_nts, rel=1e-8)


def test_per_example_gradients_equal_the_loop_row_by_row():
    case = PER_EXAMPLE[0]()
    names = [n for n, _ in case.model.named_parameters()]
    loss = FunctionalLoss(case.model, case.loss_fn, names)
    fast = per_example_gradients(loss, loss.values, case.batch, case.inputs.shape[0])
    flat = torch.cat([fast[n].reshape(case.inputs.shape[0], -1) for n in names], 1)
    assert torch.allclose(flat, per_example_loop(case, names), atol=1e-12)


def _micro_batch_grads(case, pieces):
    model = copy.deepcopy(case.model)
    replace_all_batch_norm_modules_(model)
    params = list(model.parameters())
    bounds = [round(i * case.inputs.shape[0] / pieces) for i in range(pieces + 1)]
    rows, sizes = [], []
    for a, b in pairwise(bounds):
        loss = case.criterion(model(case.inputs[a:b]), case.targets[a:b])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
        sizes.append(b - a)
    full = case.criterion(model(case.inputs), case.targets)
    centre = torch.cat([g.reshape(-1) for g in torch.autograd.grad(full, params)])
    return torch.stack(rows), torch.tensor(sizes, dtype=centre.dtype), centre


@pytest.mark.parametrize("pieces", [3, 5])
def test_micro_batch_and_two_batch_statistics_equal_the_loop_with_batchnorm(pieces):
    case = batchnorm_train()
    groups = default_groups(case.model)
    _, cols = _group_columns(case, groups)
    rows, sizes, centre = _micro_batch_grads(case, pieces)
    n = sizes.sum()
    auto = estimate(
        case.model, case.loss_fn, case.batch, quantities=["grad_norm", "grad_variance"],
        micro_batches=pieces,
    )  # fmt: skip
    assert auto.settings["variance"] == "micro_batch"
    two = estimate(
        case.model, case.loss_fn, case.batch, quantities=["grad_variance"],
        variance="two_batch", micro_batches=pieces,
    )  # fmt: skip
    for g, idx in cols.items():
        exp = _expected(rows[:, idx], sizes, centre[idx], idx.numel())
        assert auto[g].grad_norm == pytest.approx(exp["grad_norm"], rel=1e-10)
        assert auto[g].grad_variance == pytest.approx(exp["grad_variance"], rel=1e-8)
        # McCandlish et al.: small batches b = N/M against the whole batch
        small = (sizes * rows[:, idx].square().sum(1)).sum() / n
        big = centre[idx].square().sum()
        trace = ((small - big) / (pieces / n - 1 / n)).item()
        assert two[g].grad_variance == pytest.approx(trace / idx.numel(), rel=1e-8, abs=1e-14)


class SharedGradient(torch.nn.Module):
    """``x @ (a + b)``: autograd hands ``a`` and ``b`` one and the same gradient tensor."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))

    def forward(self, x):
        return x @ (self.a + self.b)


@pytest.mark.parametrize("variance", ["per_example", "micro_batch", "two_batch"])
def test_noise_is_exact_when_parameters_share_one_gradient_tensor(variance):
    model = SharedGradient()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(12, 3, generator=g, dtype=torch.float64)
    y = torch.randn(12, generator=g, dtype=torch.float64)

    def loss_fn(m, batch):
        return (m(batch[0]) - batch[1]).square().mean()

    def grad_a(a, b):  # the gradient of a (equal to that of b) on examples a:b, by autograd
        return torch.autograd.grad(loss_fn(model, (x[a:b], y[a:b])), model.a)[0]

    size = 1 if variance == "per_example" else 3  # examples per sample
    rows = torch.stack([grad_a(i, i + size) for i in range(0, 12, size)])
    weights = torch.full((rows.shape[0],), float(size), dtype=torch.float64)
    centre = grad_a(0, 12)
    exp = _expected(rows, weights, centre, 3)
    if variance == "two_batch":  # McCandlish et al., App. A: equal to the ANOVA here
        small, big = rows.square().sum(1).mean(), centre.square().sum()
        trace = ((small - big) / (rows.shape[0] / 12 - 1 / 12)).item()
        assert trace / 3 == pytest.approx(exp["grad_variance"], rel=1e-10)
    report = estimate(
        model, loss_fn, (x, y), groups={"a": ["a"], "b": ["b"]}, variance=variance,
        quantities=["grad_norm", "grad_variance"], micro_batches=4, example_chunk_size=5,
    )  # fmt: skip
    for group in ("a", "b"):
        for key in ("grad_norm", "grad_variance", "grad_variance_stderr", "grad_norm_stderr"):
            got = getattr(report[group], key)
            assert got == pytest.approx(exp[key], rel=1e-10), (group, key)


def test_noise_to_signal_over_several_batches_is_that_of_one_batch_size():
    """With n equal batches of B examples, noise_to_signal = tr(Σ)/(B‖G‖²) with B the batch
    size (not N = nB): passing more batches sharpens the estimate of one step's noise, it does
    not change what is estimated. Checked against the autograd loop, batch by batch."""
    gen = torch.Generator().manual_seed(3)
    inputs = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    targets = 4.0 + inputs @ torch.tensor([[1.0], [-2.0], [0.5]], dtype=torch.float64)
    targets = targets + 0.5 * torch.randn(40, 1, generator=gen, dtype=torch.float64)
    model = torch.nn.Linear(3, 1).double()
    case = Case("linear", model, inputs, targets, torch.nn.functional.mse_loss)
    groups = default_groups(case.model)
    names, cols = _group_columns(case, groups)
    grads = per_example_loop(case, names)  # (N, P)
    n_total = grads.shape[0]
    half = n_total // 2
    assert 2 * half == n_total and half >= 2
    batches = [
        (case.inputs[:half], case.targets[:half]),
        (case.inputs[half:], case.targets[half:]),
    ]
    report = estimate(
        case.model, case.loss_fn, batches, quantities=["grad_norm", "grad_variance"],
        variance="per_example",
    )  # fmt: skip
    for g, idx in cols.items():
        sub = grads[:, idx]
        trace = (exact_trace_sigma(sub[:half]) + exact_trace_sigma(sub[half:])) / 2
        signal = sub.mean(0).square().sum().item() - trace / n_total  # unbiased ‖G‖²
        assert signal > 0, "the case must have a detectable signal to test the scaling"
        expected = trace / (half * signal)
        assert report[g].noise_to_signal == pytest.approx(expected, rel=1e-8), g
