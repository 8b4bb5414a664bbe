"""Per-group schedules and factors compose with the engine through ``LayerwiseLR``, a torch
scheduler, built on the engine or on the base optimizer: the rate each base step uses is,
bit for bit, ``((initial_lr * factor) * schedule(t)) * multiplier`` (the rate the removed
``schedule=``/``factors=`` path gave), and outside the step ``group["lr"]`` is the base
rate ``(initial_lr * factor) * schedule(t)``."""

from __future__ import annotations

import math

import pytest
import torch

from layerwise.engine import LayerwiseOptimizer
from layerwise.policies import LayerwiseLR, SensitivityController, schedules

from .helpers import data, loss_fn, mlp, named_groups

STEPS, EVERY, LR = 9, 2, 0.01
FACTORS = {"fc0": 0.3, "fc1": 0.7, "fc2": 1.0}
SCHEDULES = {
    "fc0": schedules.join([schedules.linear_warmup(3), schedules.cosine(6)], [3]),
    "fc1": schedules.cosine(STEPS),
    "fc2": schedules.step(2, gamma=0.5),
}


@pytest.mark.parametrize("on", ["engine", "base"])
def test_rates_are_schedule_times_factor_times_multiplier(on):
    net = mlp(dropout=0.0)
    base = torch.optim.Adam(named_groups(net), lr=LR)
    controller = SensitivityController("trust_ratio", alpha=1.0, max_rel_stderr=math.inf)
    opt = LayerwiseOptimizer(
        base, model=net, loss_fn=loss_fn, controller=controller, recalibrate_every=EVERY,
        estimator={"quantities": ["grad_norm"]},
    )  # fmt: skip
    sched = LayerwiseLR(opt if on == "engine" else base, SCHEDULES, FACTORS)
    seen = []
    base.register_step_pre_hook(
        lambda o, args, kwargs: seen.append({g["name"]: g["lr"] for g in o.param_groups})
    )
    multipliers, base_rates = [], []
    for batch in data(STEPS):
        multipliers.append(opt.multipliers)  # in effect for this step
        opt.zero_grad()
        loss_fn(net, batch).backward()
        opt.step(batch)
        sched.step()
        base_rates.append({g["name"]: g["lr"] for g in base.param_groups})

    assert any(m != 1.0 for m in multipliers[-1].values())  # the controller did adapt
    for t in range(STEPS):  # step t + 1 runs at the scheduler's epoch t
        for name, factor in FACTORS.items():
            lr_base = LR * factor * SCHEDULES[name](t)
            assert seen[t][name] == lr_base * multipliers[t][name], (t, name)
            after = LR * factor * SCHEDULES[name](t + 1)
            assert base_rates[t][name] == after, (t, name)
    for g in base.param_groups:
        assert opt.get_last_lr()[g["name"]] == g["lr"] * opt.multipliers[g["name"]]
        assert g["initial_lr"] == LR
    history = opt.history
    assert (history["effective_lr"] == history["base_lr"] * history["multiplier"]).all()
