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

from sensitivity import default_groups, estimate, per_example_gradients
from sensitivity.functional import FunctionalLoss

from .cases import CASES, batchnorm_train
from .reference import per_example_loop

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
