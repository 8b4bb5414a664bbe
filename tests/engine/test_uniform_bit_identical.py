"""With multipliers of 1 everywhere the wrapped optimizer is the bare optimizer, bit for bit.

The uniform controller still recalibrates (estimates run between steps), so this also
proves that recalibration leaves no trace on the training run: parameters, gradients,
optimizer state and the global RNG (the model has dropout) are untouched.
"""

from __future__ import annotations

import pytest
import torch

from layerwise.engine import LayerwiseOptimizer
from layerwise.policies import SensitivityController

from .helpers import (
    OPTIMIZERS,
    SCHEDULERS,
    assert_identical,
    data,
    loss_fn,
    mlp,
    named_groups,
    params_of,
    scheduler_step,
)

STEPS = 7


def _train(opt_name, sched_name, wrapped, tensor_lr=False, quantities=("grad_norm",)):
    net = mlp()
    groups = named_groups(net, tensor_lr=tensor_lr)
    base = OPTIMIZERS[opt_name](groups)
    opt = base
    if wrapped:
        opt = LayerwiseOptimizer(
            base, model=net, loss_fn=loss_fn, controller=SensitivityController("uniform"),
            recalibrate_every=3, estimator={"probes": 2, "quantities": quantities},
        )  # fmt: skip
    sched = SCHEDULERS[sched_name](opt)
    torch.manual_seed(5)
    trajectory, lrs = [], []
    for batch in data(STEPS):
        opt.zero_grad()
        loss = loss_fn(net, batch)
        loss.backward()
        opt.step(batch) if wrapped else opt.step()
        scheduler_step(sched, loss.detach())
        trajectory.append(params_of(net))
        lrs.append([float(g["lr"]) for g in base.param_groups])
    return trajectory, lrs, opt, base


@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_uniform_controller_reproduces_bare_optimizer(opt_name, sched_name):
    bare, bare_lrs, _, bare_opt = _train(opt_name, sched_name, wrapped=False)
    ours, our_lrs, engine, base = _train(opt_name, sched_name, wrapped=True)
    for a, b in zip(bare, ours, strict=True):
        assert_identical(a, b)
    assert bare_lrs == our_lrs
    assert len(engine.history) == 2 * 3  # recalibrations after steps 3 and 6; 3 groups
    assert engine.multipliers == {"fc0": 1.0, "fc1": 1.0, "fc2": 1.0}
    for p, q in zip(bare_opt.state.values(), base.state.values(), strict=True):
        for key in p:
            assert torch.equal(torch.as_tensor(p[key]), torch.as_tensor(q[key]))


def test_recalibration_with_every_quantity_leaves_no_trace():
    """Per-example gradients, HVPs and dropout inside the estimate: still bit-identical."""
    bare, bare_lrs, *_ = _train("adamw", "cosine", wrapped=False)
    ours, our_lrs, engine, _ = _train("adamw", "cosine", wrapped=True, quantities="all")
    for a, b in zip(bare, ours, strict=True):
        assert_identical(a, b)
    assert bare_lrs == our_lrs
    assert engine.history["hessian_trace"].notna().all()


def test_tensor_learning_rate_bit_identical():
    bare, *_ = _train("adam", "cosine", wrapped=False, tensor_lr=True)
    ours, _, _engine, base = _train("adam", "cosine", wrapped=True, tensor_lr=True)
    for a, b in zip(bare, ours, strict=True):
        assert_identical(a, b)
    assert all(isinstance(g["lr"], torch.Tensor) for g in base.param_groups)
