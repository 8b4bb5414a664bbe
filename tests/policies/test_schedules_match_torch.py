"""Each schedule that torch also has gives torch's learning rates, stepping a real optimizer.

torch's schedulers are recursive (each rate from the previous one); ours are closed forms.
Both are run side by side on an SGD optimizer with two groups of different base rates and
compared at every step to 1e-12 relative (absolute 1e-18 where the rate is 0).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch.optim import lr_scheduler as L

from layerwise.policies import schedules as S

BASE_LRS = (0.1, 0.025)


def _optimizer(base_lrs=BASE_LRS):
    a = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    groups = [{"params": [a], "lr": base_lrs[0]}, {"params": [b], "lr": base_lrs[1]}]
    return torch.optim.SGD(groups, lr=1.0)


def _sequential(*pairs, milestones):
    def make(opt):
        return L.SequentialLR(opt, [p(opt) for p in pairs], milestones=milestones)

    return make


# (id, torch scheduler from an optimizer, our schedule, steps to compare[, base rates])
CASES = [
    ("StepLR", lambda o: L.StepLR(o, step_size=7, gamma=0.5), S.step(7, 0.5), 60),
    (
        "MultiStepLR",
        lambda o: L.MultiStepLR(o, [3, 10, 11], 0.2),
        S.multistep([3, 10, 11], 0.2),
        30,
    ),
    ("ExponentialLR", lambda o: L.ExponentialLR(o, gamma=0.97), S.exponential(0.97), 300),
    ("CosineAnnealingLR", lambda o: L.CosineAnnealingLR(o, T_max=100), S.cosine(100), 101),
    (
        "CosineAnnealingLR_eta_min",  # eta_min is absolute in torch, relative to each base here
        lambda o: L.CosineAnnealingLR(o, T_max=64, eta_min=0.1 * BASE_LRS[0]),
        S.cosine(64, floor=0.1),
        65,
        (BASE_LRS[0], BASE_LRS[0]),
    ),
    (
        "CosineAnnealingWarmRestarts",
        lambda o: L.CosineAnnealingWarmRestarts(o, T_0=5),
        S.cosine_warm_restarts(5),
        60,
    ),
    (
        "CosineAnnealingWarmRestarts_T_mult",
        lambda o: L.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2),
        S.cosine_warm_restarts(3, period_mult=2),
        200,
    ),
    (
        "PolynomialLR",
        lambda o: L.PolynomialLR(o, total_iters=40, power=0.9),
        S.polynomial(40, 0.9),
        60,
    ),
    (
        "PolynomialLR_sq",
        lambda o: L.PolynomialLR(o, total_iters=25, power=2.0),
        S.polynomial(25, 2.0),
        40,
    ),
    (
        "LinearLR",
        lambda o: L.LinearLR(o, start_factor=0.01, total_iters=30),
        S.linear_warmup(30, 0.01),
        50,
    ),
    (
        "SequentialLR_warmup_cosine",
        _sequential(
            lambda o: L.LinearLR(o, start_factor=0.1, total_iters=10),
            lambda o: L.CosineAnnealingLR(o, T_max=40),
            milestones=[10],
        ),
        S.join([S.linear_warmup(10, 0.1), S.cosine(40)], [10]),
        51,
    ),
    (
        "SequentialLR_three",
        _sequential(
            lambda o: L.LinearLR(o, start_factor=0.5, total_iters=4),
            lambda o: L.StepLR(o, step_size=5, gamma=0.5),
            lambda o: L.ExponentialLR(o, gamma=0.9),
            milestones=[6, 26],
        ),
        S.join([S.linear_warmup(4, 0.5), S.step(5, 0.5), S.exponential(0.9)], [6, 26]),
        60,
    ),
]


def _same(got: float, want: float) -> bool:
    return abs(got - want) <= 1e-12 * abs(want) + 1e-18


@pytest.mark.parametrize(
    ("make", "schedule", "steps", "base_lrs"),
    [(*c[1:4], c[4] if len(c) > 4 else BASE_LRS) for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_schedule_gives_torch_learning_rates_step_by_step(make, schedule, steps, base_lrs):
    opt = _optimizer(base_lrs)
    scheduler = make(opt)
    for t in range(steps):
        got = [base * schedule(t) for base in base_lrs]
        want = [group["lr"] for group in opt.param_groups]
        assert all(map(_same, got, want)), f"step {t}: ours {got}, torch {want}"
        opt.step()
        scheduler.step()


def _closed_form(scheduler, t):
    with warnings.catch_warnings():  # step(epoch) is deprecated but is the closed-form path
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step(t)
    return [group["lr"] for group in scheduler.optimizer.param_groups]


@pytest.mark.parametrize(
    ("make", "schedule", "steps"),
    [
        (lambda o: L.CosineAnnealingLR(o, T_max=50), S.cosine(50), [0, 1, 17, 25, 49, 50]),
        (lambda o: L.StepLR(o, 4, 0.3), S.step(4, 0.3), [0, 3, 4, 99, 1000]),
        (lambda o: L.MultiStepLR(o, [2, 9], 0.5), S.multistep([2, 9], 0.5), [0, 2, 8, 9, 500]),
        (lambda o: L.ExponentialLR(o, 0.95), S.exponential(0.95), [0, 1, 77, 400]),
        (lambda o: L.PolynomialLR(o, 20, 1.5), S.polynomial(20, 1.5), [0, 5, 19, 20, 21, 900]),
        (lambda o: L.LinearLR(o, 0.2, total_iters=8), S.linear_warmup(8, 0.2), [0, 3, 8, 9, 100]),
        (
            lambda o: L.CosineAnnealingWarmRestarts(o, T_0=4, T_mult=3),
            S.cosine_warm_restarts(4, 3),
            [0, 3, 4, 15, 16, 51, 52, 500],
        ),
    ],
    ids=["cosine", "step", "multistep", "exponential", "polynomial", "linear", "restarts"],
)
def test_schedule_equals_torch_closed_form_at_arbitrary_steps(make, schedule, steps):
    scheduler = make(_optimizer())
    for t in steps:
        got = [base * schedule(t) for base in BASE_LRS]
        want = _closed_form(scheduler, t)
        assert all(map(_same, got, want)), f"step {t}: ours {got}, torch {want}"


def test_cosine_holds_its_floor_after_the_horizon_where_torch_turns_back_up():
    scheduler = L.CosineAnnealingLR(_optimizer(), T_max=10)
    assert _closed_form(scheduler, 15)[0] > 0.0  # torch's cosine is periodic past T_max
    assert S.cosine(10)(15) == 0.0
