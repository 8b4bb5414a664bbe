"""A non-finite gradient never reaches the parameters: at any step (not only at a
recalibration) the base step is skipped, counted, logged, and the controller falls back to
uniform; too many in a row raise a named error; the check reads the device once per step."""

from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch
from torch import nn

from layerwise.engine import LayerwiseOptimizer, NonFiniteGradientError
from layerwise.engine.nonfinite import FiniteCheck, nonfinite_groups
from layerwise.policies import Safety, SensitivityController

from .helpers import OPTIMIZERS, data, loss_fn, mlp, named_groups, params_of

ESTIMATOR = {"probes": 2, "quantities": ["grad_norm", "hessian_trace"], "hvp_mode": "vjp"}


def _engine(net, opt_name="adam", controller=True, **kwargs):
    base = OPTIMIZERS[opt_name](named_groups(net))
    if not controller:
        return LayerwiseOptimizer(base, **kwargs)
    ctrl = SensitivityController("trust_ratio", alpha=1.0, max_rel_stderr=math.inf,
                                 safety=Safety(cooldown=1, hysteresis=1))  # fmt: skip
    return LayerwiseOptimizer(
        base, model=net, loss_fn=loss_fn, controller=ctrl, recalibrate_every=2,
        estimator=ESTIMATOR, **kwargs,
    )  # fmt: skip


def _step(net, opt, batch, poison=None):
    opt.zero_grad()
    loss_fn(net, batch).backward()
    if poison is not None:
        layer, value = poison
        net[layer].weight.grad[0, 0] = value
    return opt.step(batch)


def _snapshot(net, opt):
    return params_of(net), copy.deepcopy(opt.base.state_dict()), opt.steps


def _assert_same(before, after):
    (p0, s0, n0), (p1, s1, n1) = before, after
    assert all(torch.equal(a, b) for a, b in zip(p0, p1, strict=True))
    assert n0 == n1
    drop = [{k: v for k, v in g.items() if k != "lr_multiplier"} for g in s0["param_groups"]]
    assert drop == [
        {k: v for k, v in g.items() if k != "lr_multiplier"} for g in s1["param_groups"]
    ]
    assert s0["state"].keys() == s1["state"].keys()
    for k, entry in s0["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(s1["state"][k][key]))


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_a_non_finite_gradient_between_recalibrations_skips_the_base_step(opt_name, value):
    net = mlp(dropout=0.0)
    opt = _engine(net, opt_name)
    batches = data(4)
    for batch in batches[:2]:  # a recalibration after step 2: the multipliers move
        _step(net, opt, batch)
    assert any(m != 1.0 for m in opt.multipliers.values())
    before, rows = _snapshot(net, opt), len(opt.history)
    _step(net, opt, batches[2], poison=(3, value))  # step 3 would not recalibrate
    _assert_same(before, _snapshot(net, opt))
    assert opt.nonfinite_steps == 1 and opt.steps == 2
    assert opt.multipliers == {"fc0": 1.0, "fc1": 1.0, "fc2": 1.0}  # the controller fell back
    assert opt.controller.state_dict()["gate"]["phase"] == "cooldown"
    skipped = opt.history.iloc[rows:]
    assert list(skipped["group"]) == ["fc0", "fc1", "fc2"] and (skipped["step"] == 2).all()
    assert skipped["skipped"].all() and skipped["fallback"].all()
    why = "non-finite gradients in group(s) fc1 after step 2 (1 in a row, 1 in all)"
    assert (skipped["reason"] == f"skipped: {why}; base step skipped").all()
    assert (skipped["event"] == f"fallback: {why}").all()
    assert (skipped["previous_multiplier"] != 1.0).any() and (skipped["multiplier"] == 1.0).all()
    _step(net, opt, batches[3])  # the next finite step is taken
    assert opt.steps == 3 and all(torch.isfinite(p).all() for p in net.parameters())


def test_without_a_controller_the_step_is_skipped_and_logged():
    net = mlp(dropout=0.0)
    opt = _engine(net, "sgd_momentum", controller=False)
    opt.base.param_groups[0]["lr_multiplier"] = 0.5
    batch = data(1)[0]
    _step(net, opt, batch)
    before = _snapshot(net, opt)
    assert _step(net, opt, batch, poison=(0, math.nan)) is None
    _assert_same(before, _snapshot(net, opt))
    history = opt.history
    assert list(history["multiplier"]) == [0.5, 1.0, 1.0]  # no controller: kept
    assert not history["fallback"].any() and history["skipped"].all()
    assert (history["event"] == "non-finite gradients in group(s) fc0 after step 1 (1 in a row, "
            "1 in all): base step skipped").all()  # fmt: skip


def test_consecutive_skips_raise_a_named_error_and_a_taken_step_resets_the_count():
    net = mlp(dropout=0.0)
    seen = []
    opt = _engine(net, max_nonfinite_steps=3, callback=seen.append)
    batch = data(1)[0]
    _step(net, opt, batch, poison=(0, math.nan))
    _step(net, opt, batch, poison=(0, math.nan))
    _step(net, opt, batch)  # taken: the count in a row starts over
    _step(net, opt, batch, poison=(5, math.inf))
    _step(net, opt, batch, poison=(0, math.nan))
    before = params_of(net)
    with pytest.raises(NonFiniteGradientError) as caught:
        _step(net, opt, batch, poison=(0, math.nan))
    message = str(caught.value)
    assert message.startswith("3 steps in a row had non-finite gradients (the last in group(s) "
                              "fc0); each was skipped, so the parameters are still those after "
                              "step 1. Check the learning rates (now {'fc0': '0.01'")  # fmt: skip
    assert "max_nonfinite_steps=3" in message and "GradScaler" in message
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert opt.nonfinite_steps == 5 and opt.steps == 1
    assert len(seen) == 5 and all(r.report is None and r.decision.fallback for r in seen)
    assert "fc2" in seen[2].rows[0]["reason"]  # the inf was in fc2 (layer 5)


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (0, ValueError, "max_nonfinite_steps must be an integer >= 1, got 0"),
        (2.0, TypeError, "max_nonfinite_steps must be an integer, got 2.0"),
        (True, TypeError, "max_nonfinite_steps must be an integer, got True"),
    ],
)
def test_max_nonfinite_steps_is_validated(value, error, match):
    net = mlp(dropout=0.0)
    with pytest.raises(error, match=match):
        LayerwiseOptimizer(torch.optim.SGD(net.parameters(), lr=0.1), max_nonfinite_steps=value)


def test_a_closure_with_non_finite_gradients_skips_the_step():
    net = mlp(dropout=0.0)
    opt = _engine(net, "adamw", controller=False)
    batch = data(1)[0]

    def closure(poison=False):
        opt.zero_grad()
        loss = loss_fn(net, batch)
        loss.backward()
        if poison:
            net[0].bias.grad[1] = math.nan
        return loss

    assert torch.is_tensor(opt.step(closure))
    before = _snapshot(net, opt)
    assert opt.step(lambda: closure(poison=True)) is None
    _assert_same(before, _snapshot(net, opt))
    assert opt.nonfinite_steps == 1 and opt.steps == 1


def test_a_sparse_gradient_is_checked_by_its_values():
    emb = nn.Embedding(5, 3, sparse=True)
    opt = LayerwiseOptimizer(torch.optim.SGD([{"params": emb.parameters(), "name": "emb"}],
                                             lr=0.1))  # fmt: skip
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    emb.weight.grad._values()[0, 0] = math.nan
    opt.step()
    assert torch.equal(emb.weight, before) and opt.nonfinite_steps == 1


def test_the_counts_are_checkpointed_and_checked():
    net = mlp(dropout=0.0)
    opt = _engine(net)
    batch = data(1)[0]
    _step(net, opt, batch, poison=(0, math.nan))
    state = opt.state_dict()
    assert state["layerwise"]["nonfinite"] == {"total": 1, "consecutive": 1}
    again = _engine(mlp(dropout=0.0))
    again.load_state_dict(copy.deepcopy(state))
    assert again.nonfinite_steps == 1
    state["layerwise"]["nonfinite"] = {"total": 1, "consecutive": 2}
    fresh = _engine(mlp(dropout=0.0))
    with pytest.raises(ValueError, match="nonfinite state: consecutive 2 > total 1"):
        fresh.load_state_dict(state)
    assert fresh.nonfinite_steps == 0


READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy")


def _count_reads(monkeypatch, fn):
    counts: Counter[str] = Counter()
    with monkeypatch.context() as m:
        for name in READS:
            original = getattr(torch.Tensor, name)

            def counted(self, *args, _original=original, _name=name, **kwargs):
                counts[_name] += 1
                return _original(self, *args, **kwargs)

            m.setattr(torch.Tensor, name, counted)
        fn()
    return counts


def test_the_check_reads_the_device_once_per_step(monkeypatch):
    """Between recalibrations a step through the engine reads one device value more than
    the bare optimizer's step: the verdict of the fused check."""
    batch = data(1)[0]
    reads = {}
    for wrapped in (False, True):
        net = mlp(dropout=0.0)
        base = torch.optim.SGD(named_groups(net, lr_multiplier=0.5), lr=0.1, momentum=0.9)
        opt = LayerwiseOptimizer(base) if wrapped else base
        for _ in range(2):  # the second step, with momentum buffers in place
            opt.zero_grad()
            loss_fn(net, batch).backward()
            reads[wrapped] = _count_reads(monkeypatch, opt.step)
    assert reads[True] - reads[False] == Counter({"__bool__": 1})


def test_the_check_leaves_finite_gradients_bit_for_bit_and_names_the_groups():
    """GradScaler's check at scale 1 writes each value back: signed zeros, subnormals and the
    largest doubles stay as they were, in every dtype; a NaN is found in its own group."""
    values = {
        torch.float32: [-0.0, 1e-45, -3e38, 1.0],
        torch.float64: [-0.0, 5e-324, 1.7976931348623157e308, -1e-300],
        torch.float16: [-0.0, 6e-8, 65504.0, -1.0],
        torch.bfloat16: [-0.0, 1e-40, 3e38, 2.0],
    }
    params = [torch.zeros(4, dtype=dtype, requires_grad=True) for dtype in values]
    for p, (dtype, v) in zip(params, values.items(), strict=True):
        p.grad = torch.tensor(v, dtype=dtype)
    groups = [{"params": params[:2]}, {"params": params[2:]}]
    before = [p.grad.clone() for p in params]
    assert nonfinite_groups(groups) is None
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.grad.view(torch.uint8), b.view(torch.uint8))  # the very bits
    params[3].grad[1] = math.nan
    assert nonfinite_groups(groups) == [1]
    params[0].grad[0] = -math.inf
    assert nonfinite_groups(groups) == [0, 1]


def test_one_check_reused_over_steps_gives_each_step_its_own_verdict():
    """The engine's FiniteCheck keeps its flag tensors across steps: a flagged step does not
    leak into the next; a sparse gradient sends it the general way, which stays exact."""
    dense = torch.zeros(3, requires_grad=True)
    emb = nn.Embedding(4, 2, sparse=True)
    groups = [{"params": [dense]}, {"params": list(emb.parameters())}]
    check = FiniteCheck()
    dense.grad = torch.ones(3)
    assert check(groups) is None
    dense.grad[1] = math.inf
    assert check(groups) == [0]
    dense.grad[1] = 2.0
    assert check(groups) is None  # the flag set by the step before was cleared
    emb(torch.tensor([1, 3])).sum().backward()
    assert check(groups) is None
    emb.weight.grad._values()[1, 0] = math.nan
    assert check(groups) == [1]
    emb.weight.grad = None
    dense.grad[0] = -math.inf
    assert check(groups) == [0]
    dense.grad[0] = 0.0
    assert check(groups) is None


def test_check_finite_false_leaves_the_gradients_to_the_base_optimizer(monkeypatch):
    """check_finite=False: no check, no read of the device, nothing skipped or counted; a
    NaN reaches the parameters as it would without the engine."""
    net = mlp(dropout=0.0)
    opt = _engine(net, "sgd_momentum", controller=False, check_finite=False)
    batch = data(1)[0]
    _step(net, opt, batch, poison=(0, math.nan))
    assert opt.nonfinite_steps == 0 and opt.steps == 1 and len(opt.history) == 0
    assert net[0].weight.isnan().any()
    opt.zero_grad()
    loss_fn(net, batch).backward()
    assert _count_reads(monkeypatch, opt.step) == Counter()
    with pytest.raises(TypeError, match="check_finite must be a bool, got 1"):
        _engine(net, controller=False, check_finite=1)


def test_the_trainer_settings_pass_check_finite_through():
    from layerwise.engine.trainer_support import CurrentBatch, EngineSettings

    net = mlp(dropout=0.0)
    for flag in (True, False):
        settings = EngineSettings("trust_ratio", check_finite=flag)
        engine = settings.wrap(
            OPTIMIZERS["sgd_momentum"](named_groups(net)), net, loss_fn, CurrentBatch("a test")
        )
        assert (engine._check is not None) == flag
    with pytest.raises(TypeError, match="check_finite must be a bool, got 'no'"):
        EngineSettings("trust_ratio", check_finite="no")


@pytest.mark.parametrize("trainer", ["lightning", "huggingface"])
def test_the_trainer_callbacks_pass_check_finite_through(trainer):
    pytest.importorskip({"lightning": "lightning", "huggingface": "transformers"}[trainer])
    from importlib import import_module

    callback = import_module(f"layerwise.engine.{trainer}").LayerwiseCallback
    for flag in (True, False):
        assert callback("trust_ratio", check_finite=flag).settings.check_finite is flag
    with pytest.raises(TypeError, match="check_finite must be a bool, got 0"):
        callback("trust_ratio", check_finite=0)
