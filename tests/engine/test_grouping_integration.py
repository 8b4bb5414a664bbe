"""Groups from ``layerwise.policies.group_parameters`` drive the engine end to end: the sensitivity
mapping it builds is the grouping's own, and schedule x factors (``LayerwiseLR`` on the
engine) x multiplier compose."""

from __future__ import annotations

import math

import pytest
import torch

from layerwise.engine import LayerwiseOptimizer
from layerwise.policies import (
    LayerwiseLR,
    SensitivityController,
    group_parameters,
    layer_decay,
    schedules,
)

from .helpers import data, loss_fn, mlp


def test_engine_uses_grouping_names_and_composes_schedule_factors_multipliers():
    net = mlp(dropout=0.0)
    groups = group_parameters(net, "depth")
    base = torch.optim.AdamW(groups.to_optimizer_groups(lr=0.01))
    factors = layer_decay(groups, 0.5)
    schedule = schedules.cosine(6)
    controller = SensitivityController("trust_ratio", alpha=1.0, max_rel_stderr=math.inf)
    opt = LayerwiseOptimizer(
        base, model=net, loss_fn=loss_fn, controller=controller, recalibrate_every=2,
        estimator={"quantities": ["grad_norm"]},
    )  # fmt: skip
    sched = LayerwiseLR(opt, schedule, factors)
    assert opt._recalibrator.mapping == groups.mapping()
    for batch in data(4):
        opt.zero_grad()
        loss_fn(net, batch).backward()
        opt.step(batch)
        sched.step()
    for g in base.param_groups:
        name = g["name"]
        assert g["lr"] == pytest.approx(0.01 * factors[name] * schedule(4))
        assert opt.get_last_lr()[name] == pytest.approx(g["lr"] * opt.multipliers[name])
    assert set(opt.history["group"]) == set(groups.names)
    assert any(m != 1.0 for m in opt.multipliers.values())
