"""``estimate`` leaves no trace on any model: parameters, buffers (BatchNorm running
statistics), ``.grad``, train/eval modes and the global RNG state are exactly as before,
also when the loss function fails or changes modes itself."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerwise.sensitivity import estimate

from .cases import CASE_IDS, CASES, Case, cross_entropy


def dropout() -> Case:
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 2)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    return Case("dropout", model, x, torch.randint(0, 2, (8,)), cross_entropy)


ALL = [*CASES, dropout]


def _snapshot(model):
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "ids": {k: id(v) for k, v in model.state_dict(keep_vars=True).items()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
        "grad_values": {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        },
        "modes": {n: m.training for n, m in model.named_modules()},
        "rng": torch.get_rng_state(),
    }


def _assert_unchanged(model, before):
    after = model.state_dict(keep_vars=True)
    for k, v in before["state"].items():
        assert torch.equal(after[k].detach(), v), k
        assert id(after[k]) == before["ids"][k], k
    for n, p in model.named_parameters():
        assert p.grad is before["grads"][n], n
        if p.grad is not None:
            assert torch.equal(p.grad, before["grad_values"][n]), n
    assert {n: m.training for n, m in model.named_modules()} == before["modes"]
    assert torch.equal(torch.get_rng_state(), before["rng"])


def _prepare(model):
    first = next(model.parameters())
    first.grad = torch.full_like(first, 0.25)  # one .grad set, the others None
    for m in model.modules():
        if isinstance(m, nn.Tanh):
            m.eval()  # a mix of modes
    return model


@pytest.mark.parametrize("make", ALL, ids=[*CASE_IDS, "dropout"])
def test_every_quantity_leaves_model_grads_modes_and_rng_untouched(make):
    case = make()
    model = _prepare(case.model)
    before = _snapshot(model)
    report = estimate(model, case.loss_fn, case.batch, probes=4, chunk_size=2, micro_batches=3)
    assert all(abs(g.hessian_trace) < float("inf") for g in report)
    _assert_unchanged(model, before)


def test_batchnorm_running_statistics_are_not_updated():
    case = CASES[-1]()
    bn = case.model[1]
    mean, var, count = (
        bn.running_mean.clone(),
        bn.running_var.clone(),
        bn.num_batches_tracked.item(),
    )
    estimate(case.model, case.loss_fn, case.batch, probes=2)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    assert bn.num_batches_tracked.item() == count


def test_nothing_changes_when_the_loss_fails_or_switches_modes():
    case = dropout()
    model = _prepare(case.model)
    before = _snapshot(model)
    calls = []

    def flaky(m, batch):
        m.eval()  # a loss function that changes modes behind our back
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return case.loss_fn(m, batch)

    with pytest.raises(RuntimeError, match="boom"):  # fails in the per-example pass
        estimate(model, flaky, case.batch, probes=2)
    _assert_unchanged(model, before)
    estimate(model, lambda m, b: (m.eval(), case.loss_fn(m, b))[1], case.batch, probes=2)
    _assert_unchanged(model, before)
