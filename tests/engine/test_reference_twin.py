"""The engine equals a slow, obvious reference loop step by step under a non-uniform controller.

The twin (the schedule_free ``_reference.py`` idea) does by hand what the engine automates:
before each step it sets every group's rate to ``base rate * multiplier``, steps, puts the
base rate back, and every ``recalibrate_every`` steps calls ``layerwise.sensitivity.estimate`` with
its own probe generator and hands the report to its own controller.
"""

from __future__ import annotations

import math

import pytest
import torch

from layerwise.engine import LayerwiseOptimizer
from layerwise.policies import SensitivityController
from layerwise.sensitivity import estimate

from .helpers import OPTIMIZERS, assert_identical, data, loss_fn, mlp, named_groups, params_of

STEPS, EVERY, WARMUP, SEED = 9, 2, 1, 3
ESTIMATOR = {"probes": 4, "quantities": ["grad_norm", "hessian_trace"]}


def _controller(rule: str) -> SensitivityController:
    # Adapt on every report (no stderr gate), so the multipliers move from the first one.
    return SensitivityController(rule, alpha=1.0, max_rel_stderr=math.inf, ema=0.0)


def _setup(opt_name: str, tensor_lr: bool):
    net = mlp()
    groups = named_groups(net, tensor_lr=tensor_lr)
    base = OPTIMIZERS[opt_name](groups)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=STEPS)
    return net, base, sched


def _engine_run(opt_name, rule, tensor_lr):
    net, base, _ = _setup(opt_name, tensor_lr)
    opt = LayerwiseOptimizer(
        base, model=net, loss_fn=loss_fn, controller=_controller(rule),
        recalibrate_every=EVERY, warmup_steps=WARMUP, estimator=ESTIMATOR, seed=SEED,
    )  # fmt: skip
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS)
    torch.manual_seed(5)
    out = []
    for batch in data(STEPS):
        opt.zero_grad()
        loss_fn(net, batch).backward()
        opt.step(batch)
        sched.step()
        out.append((params_of(net), opt.multipliers))
    return out, opt


def _twin_run(opt_name, rule, tensor_lr):
    net, base, sched = _setup(opt_name, tensor_lr)
    controller = _controller(rule)
    mapping = {g["name"]: [] for g in base.param_groups}
    names = {id(p): n for n, p in net.named_parameters()}
    for g in base.param_groups:
        mapping[g["name"]] = [names[id(p)] for p in g["params"]]
    generator = torch.Generator().manual_seed(SEED)
    multipliers = {name: 1.0 for name in mapping}
    torch.manual_seed(5)
    out = []
    for s, batch in enumerate(data(STEPS), start=1):
        base.zero_grad()
        loss_fn(net, batch).backward()
        for g in base.param_groups:  # by hand: effective rate for this step only
            g["base"] = g["lr"]
            m = multipliers[g["name"]]
            if isinstance(g["lr"], torch.Tensor):
                g["lr"] = g["lr"].clone()
                g["lr"].mul_(m)
            else:
                g["lr"] = g["lr"] * m
        base.step()
        for g in base.param_groups:
            g["lr"] = g.pop("base")
        if s >= WARMUP and (s - WARMUP) % EVERY == 0:
            report = estimate(net, loss_fn, batch, groups=mapping, generator=generator, **ESTIMATOR)
            multipliers.update(controller.update(report, step=s).multipliers)
        sched.step()
        out.append((params_of(net), dict(multipliers)))
    return out


@pytest.mark.parametrize(
    ("opt_name", "rule", "tensor_lr"),
    [
        ("sgd_momentum", "curvature", False),
        ("adam", "trust_ratio", False),
        ("adamw", "curvature+trust_ratio", False),
        ("adam", "curvature", True),
    ],
    ids=["sgd-curvature", "adam-trust_ratio", "adamw-composite", "adam-tensor_lr"],
)
def test_engine_matches_reference_twin_step_by_step(opt_name, rule, tensor_lr):
    ours, engine = _engine_run(opt_name, rule, tensor_lr)
    twin = _twin_run(opt_name, rule, tensor_lr)
    for step, ((p_ours, m_ours), (p_twin, m_twin)) in enumerate(zip(ours, twin, strict=True)):
        assert m_ours == m_twin, f"multipliers differ after step {step + 1}"
        assert_identical(p_ours, p_twin)
    # the controller did adapt: otherwise this test could not tell the two apart
    assert any(m != 1.0 for m in ours[-1][1].values())
    steps = sorted(set(engine.history["step"]))
    assert steps == [1, 3, 5, 7, 9]
