"""The multiplier is applied for the base step only and the base rate comes back exactly:
the same float object, the same tensor (identity and bits), also when the step raises."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from layerwise.engine import LayerwiseOptimizer, apply_multipliers, restore_multipliers

rates = st.floats(min_value=1e-8, max_value=10.0, allow_nan=False)
multipliers = st.floats(min_value=0.1, max_value=10.0, allow_nan=False)


@given(lr=rates, m=multipliers)
def test_float_rate_restored_to_the_same_object(lr, m):
    group = {"lr": lr, "lr_multiplier": m}
    saved = apply_multipliers([group], {})
    assert group["lr"] == (lr if m == 1.0 else lr * m)
    restore_multipliers(saved)
    assert group["lr"] is lr


@given(lr=rates, m=multipliers)
def test_tensor_rate_restored_in_place_bit_for_bit(lr, m):
    rate = torch.tensor(lr, dtype=torch.float32)
    bits = rate.clone()
    group = {"lr": rate, "lr_multiplier": m}
    backups: dict[int, torch.Tensor] = {}
    saved = apply_multipliers([group], backups)
    assert group["lr"] is rate
    if m != 1.0:
        assert torch.equal(rate, bits * m)
    restore_multipliers(saved)
    assert group["lr"] is rate and torch.equal(rate, bits)


def test_backup_buffer_is_reused():
    group = {"lr": torch.tensor(0.1), "lr_multiplier": 2.0}
    backups: dict[int, torch.Tensor] = {}
    restore_multipliers(apply_multipliers([group], backups))
    first = backups[0]
    restore_multipliers(apply_multipliers([group], backups))
    assert backups[0] is first


def test_multiplier_one_is_skipped():
    group = {"lr": 0.3, "lr_multiplier": 1.0}
    assert apply_multipliers([group], {}) == []


class _Exploding(torch.optim.SGD):
    def step(self, closure=None):
        self.seen = [g["lr"] for g in self.param_groups]
        raise RuntimeError("boom")


def test_rate_restored_when_the_base_step_raises():
    w = nn.Parameter(torch.ones(2))
    base = _Exploding([{"params": [w], "lr": 0.1, "lr_multiplier": 3.0}])
    opt = LayerwiseOptimizer(base)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    assert base.seen == [0.1 * 3.0]
    assert base.param_groups[0]["lr"] == 0.1 and opt.steps == 0


def test_base_step_sees_effective_rate_and_torch_scheduler_owns_base_rate():
    w = nn.Parameter(torch.ones(3))
    base = torch.optim.SGD([{"params": [w], "name": "w", "lr_multiplier": 0.5}], lr=1.0)
    opt = LayerwiseOptimizer(base)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    w.grad = torch.ones(3)
    opt.step()
    assert torch.allclose(w.detach(), torch.full((3,), 1.0 - 0.5))  # rate 1.0 x 0.5
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.1)  # the scheduler's value, untouched
    assert opt.get_last_lr() == {"w": pytest.approx(0.05)}
    assert sched.get_last_lr() == [pytest.approx(0.1)]


def test_closure_is_passed_positionally_like_torch():
    w = nn.Parameter(torch.ones(2))
    opt = LayerwiseOptimizer(torch.optim.LBFGS([w], lr=0.5, max_iter=3))

    def closure():
        opt.zero_grad()
        loss = (w**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert float(loss.detach()) == pytest.approx(2.0) and opt.steps == 1
    assert float((w.detach() ** 2).sum()) < 2.0


@pytest.mark.parametrize(
    ("bad", "error"),
    [("x", TypeError), (None, TypeError), (torch.tensor(2.0), TypeError), (0.0, ValueError),
     (float("nan"), ValueError), (-1.0, ValueError)],
)  # fmt: skip
def test_bad_multiplier_set_by_hand_is_named_and_no_rate_is_left_scaled(bad, error):
    w, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(1))
    groups = [{"params": [w], "name": "a"}, {"params": [b], "name": "b"}]
    base = torch.optim.SGD(groups, lr=0.1)
    opt = LayerwiseOptimizer(base)
    base.param_groups[0]["lr_multiplier"] = 0.5
    base.param_groups[1]["lr_multiplier"] = bad  # set by hand, after construction
    before = [p.detach().clone() for p in (w, b)]
    (w.sum() + b.sum()).backward()
    with pytest.raises(error, match=r"param_groups\[1\]\['lr_multiplier'\]"):
        opt.step()
    assert [g["lr"] for g in base.param_groups] == [0.1, 0.1]
    assert base.param_groups[0]["lr"] is groups[0]["lr"]
    assert all(torch.equal(p, q) for p, q in zip((w, b), before, strict=True))
    assert opt.steps == 0
