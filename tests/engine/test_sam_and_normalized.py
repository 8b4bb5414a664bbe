"""SAM and per-group gradient normalisation, alone and under the engine: SAM perturbs by
exactly ``rho g/‖g‖``, evaluates the gradient there, puts the parameters back bit for bit and
steps from them with that gradient; normalisation hands the base optimizer gradients of unit
group norm and gives ``.grad`` back as it was. Ground truth in float64."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from layerwise.engine import SAM, LayerwiseOptimizer, NormalizedGradients, OptimizerWrapper
from layerwise.engine.sam import sam_perturbation

from .helpers import data, loss_fn, mlp, named_groups, params_of

F64 = torch.float64


def _grads_at(net, batch, params=None):
    """The gradient of the loss at the parameters ``params`` (default: the net's own)."""
    probe = copy.deepcopy(net)
    if params is not None:
        with torch.no_grad():
            for p, v in zip(probe.parameters(), params, strict=True):
                p.copy_(v)
    loss_fn(probe, batch).backward()
    return [p.grad.detach().clone() for p in probe.parameters()]


def _closure(net, batch, calls=None):
    def closure():
        if calls is not None:
            calls.append([p.detach().clone() for p in net.parameters()])
        loss = loss_fn(net, batch)
        loss.backward()
        return loss

    return closure


def test_sam_perturbs_by_rho_times_the_unit_gradient_and_steps_from_w():
    net = mlp(dropout=0.0, dtype=F64)
    batch = data(1, dtype=F64)[0]
    rho, lr = 0.3, 0.1
    opt = SAM(torch.optim.SGD(net.parameters(), lr=lr), rho=rho)
    w = [p.detach().clone() for p in net.parameters()]
    g = _grads_at(net, batch)
    norm = math.sqrt(sum(float((t * t).sum()) for t in g))
    eps = [rho * t / norm for t in g]  # the paper's ε, by hand
    assert math.isclose(math.sqrt(sum(float((e * e).sum()) for e in eps)), rho, rel_tol=1e-12)

    loss_fn(net, batch).backward()
    calls: list = []
    opt.step(_closure(net, batch, calls))

    assert len(calls) == 1, "the closure is evaluated once, at w + ε"
    for at, w0, e in zip(calls[0], w, eps, strict=True):
        torch.testing.assert_close(at - w0, e, rtol=1e-10, atol=1e-14)
    g_sam = _grads_at(net, batch, [w0 + e for w0, e in zip(w, eps, strict=True)])
    for p, w0, gs in zip(net.parameters(), w, g_sam, strict=True):
        torch.testing.assert_close(p.detach(), w0 - lr * gs, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(p.grad, gs, rtol=1e-12, atol=1e-14)  # what the step used


def test_sam_puts_the_parameters_back_exactly_even_when_the_closure_raises():
    net = mlp(dropout=0.0)
    batch = data(1)[0]
    base = torch.optim.SGD(net.parameters(), lr=0.1)
    opt = SAM(base, rho=0.05)
    w = [p.detach().clone() for p in net.parameters()]
    loss_fn(net, batch).backward()

    def failing():
        loss_fn(net, batch).backward()
        raise RuntimeError("out of memory at the perturbed point")

    with pytest.raises(RuntimeError, match="perturbed point"):
        opt.step(failing)
    for p, w0 in zip(net.parameters(), w, strict=True):
        assert torch.equal(p.detach(), w0), "w + ε - ε would not be bit-exact; a copy is"

    # The perturbation is undone bit for bit before the base step: SAM with a base step of
    # rate 0 leaves every parameter exactly as it was.
    frozen = SAM(torch.optim.SGD(net.parameters(), lr=0.0), rho=0.5)
    loss_fn(net, batch).backward()
    frozen.step(_closure(net, batch))
    for p, w0 in zip(net.parameters(), w, strict=True):
        assert torch.equal(p.detach(), w0)


def test_sam_perturbation_is_zero_for_zero_or_nonfinite_gradients():
    for grads in ([torch.zeros(3), torch.zeros(2)], [torch.tensor([1.0, math.nan]), torch.ones(2)],
                  [torch.tensor([1.0, -math.inf])]):  # fmt: skip
        for e, g in zip(sam_perturbation(grads, rho=0.1), grads, strict=True):
            assert torch.equal(e, torch.zeros_like(g)), grads
    assert sam_perturbation([], 0.1) == []


def test_sam_refuses_a_step_without_closure_and_bad_rho():
    net = mlp()
    with pytest.raises(ValueError, match="needs a closure"):
        SAM(torch.optim.SGD(net.parameters(), lr=0.1)).step()
    for rho, error in ((0.0, ValueError), (-1.0, ValueError), (math.inf, ValueError),
                       (True, TypeError), ("0.1", TypeError)):  # fmt: skip
        with pytest.raises(error, match="rho"):
            SAM(torch.optim.SGD(net.parameters(), lr=0.1), rho=rho)
    with pytest.raises(TypeError, match=r"optimizer must be a torch\.optim\.Optimizer"):
        SAM(net, rho=0.1)


def test_sam_under_the_engine_applies_the_multipliers_to_the_update_only():
    """The engine's per-group multipliers scale the step taken from w with ∇L(w + ε); ε does
    not depend on them (rho is a radius, not a rate)."""
    net = mlp(dropout=0.0, dtype=F64)
    twin = copy.deepcopy(net)
    batch = data(1, dtype=F64)[0]
    multipliers = {"fc0": 0.5, "fc1": 2.0, "fc2": 1.0}
    opt = LayerwiseOptimizer(SAM(torch.optim.SGD(named_groups(net, lr=0.1)), rho=0.2))
    for g in opt.param_groups:
        g["lr_multiplier"] = multipliers[g["name"]]
    loss_fn(net, batch).backward()
    opt.step(batch, _closure(net, batch))

    plain = SAM(torch.optim.SGD(named_groups(twin, lr=0.1)), rho=0.2)
    for g in plain.param_groups:
        g["lr"] = 0.1 * multipliers[g["name"]]
    loss_fn(twin, batch).backward()
    plain.step(_closure(twin, batch))
    for a, b in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert all(g["lr"] == 0.1 for g in opt.param_groups), "base rates restored"


def test_sam_under_the_engine_skips_a_nonfinite_step_and_keeps_the_parameters():
    net = mlp(dropout=0.0)
    batch = data(1)[0]
    opt = LayerwiseOptimizer(SAM(torch.optim.SGD(named_groups(net, lr=0.1)), rho=0.05))
    w = params_of(net)
    loss_fn(net, batch).backward()
    next(net.parameters()).grad[0, 0] = math.nan

    def poisoned():
        loss = loss_fn(net, batch)
        loss.backward()
        next(net.parameters()).grad[0, 0] = math.inf
        return loss

    opt.step(batch, poisoned)
    assert opt.nonfinite_steps == 1 and opt.steps == 0
    for a, b in zip(params_of(net), w, strict=True):
        assert torch.equal(a, b)


def test_wrappers_delegate_state_and_checkpoints_to_the_base():
    net = mlp()
    base = torch.optim.Adam(named_groups(net), lr=0.01)
    opt = SAM(NormalizedGradients(base), rho=0.1)
    assert opt.param_groups is base.param_groups and opt.state is base.state
    assert opt.defaults is base.defaults and isinstance(opt, torch.optim.Optimizer)
    batch = data(1)[0]
    loss_fn(net, batch).backward()
    opt.step(_closure(net, batch))
    state = opt.state_dict()
    assert state["state"] and state == base.state_dict()
    fresh = SAM(NormalizedGradients(torch.optim.Adam(named_groups(mlp()), lr=0.01)), rho=0.1)
    fresh.load_state_dict(state)
    assert fresh.state_dict()["state"][0]["step"] == state["state"][0]["step"]
    engine = LayerwiseOptimizer(opt)
    assert engine.state_dict()["layerwise"]["base"]["class"] == "layerwise.engine.sam.SAM"
    assert repr(opt).startswith("SAM(NormalizedGradients(Adam")
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        OptimizerWrapper("sgd")


def _group_norms_seen_by(base):
    seen = []

    def hook(optimizer, args, kwargs):
        seen.append(
            [
                math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in g["params"]
                              if p.grad is not None))
                for g in optimizer.param_groups
            ]
        )  # fmt: skip

    base.register_step_pre_hook(hook)
    return seen


def test_normalized_gradients_have_unit_group_norm_and_grad_is_given_back():
    net = mlp(dropout=0.0, dtype=F64)
    batch = data(1, dtype=F64)[0]
    base = torch.optim.SGD(named_groups(net, lr=0.1))
    seen = _group_norms_seen_by(base)
    opt = NormalizedGradients(base)
    loss_fn(net, batch).backward()
    raw = [p.grad.clone() for p in net.parameters()]
    w = [p.detach().clone() for p in net.parameters()]
    opt.step()
    assert len(seen) == 1 and all(math.isclose(n, 1.0, rel_tol=1e-12) for n in seen[0])
    for p, g in zip(net.parameters(), raw, strict=True):
        assert torch.equal(p.grad, g), ".grad holds the raw gradient again"
    for group in base.param_groups:  # plain SGD: each group moved by exactly lr
        moved = math.sqrt(sum(float(((p.detach() - w0) ** 2).sum())
                              for p, w0 in zip(net.parameters(), w, strict=True)
                              if any(p is q for q in group["params"])))  # fmt: skip
        assert math.isclose(moved, 0.1, rel_tol=1e-10)


def test_normalized_gradients_leave_a_zero_group_alone_and_compose_with_sam():
    net = mlp(dropout=0.0, dtype=F64)
    batch = data(1, dtype=F64)[0]
    base = torch.optim.SGD(named_groups(net, lr=0.1))
    seen = _group_norms_seen_by(base)
    opt = LayerwiseOptimizer(SAM(NormalizedGradients(base), rho=0.05))

    def closure():
        loss = loss_fn(net, batch)
        loss.backward()
        for p in base.param_groups[1]["params"]:
            p.grad.zero_()  # a group with a zero gradient at w + ε
        return loss

    loss_fn(net, batch).backward()
    w1 = [p.detach().clone() for p in base.param_groups[1]["params"]]
    opt.step(batch, closure)
    assert math.isclose(seen[0][0], 1.0, rel_tol=1e-12) and seen[0][1] == 0.0
    assert math.isclose(seen[0][2], 1.0, rel_tol=1e-12)
    for p, w0 in zip(base.param_groups[1]["params"], w1, strict=True):
        assert torch.equal(p.detach(), w0), "no step for a zero gradient, no division by 0"
