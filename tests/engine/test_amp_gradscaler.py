"""Mixed precision: bfloat16 autocast on CPU works; a GradScaler step with infinities skips
the recalibration and keeps the multipliers; without a scaler, a step with non-finite
gradients is skipped by the engine itself; the estimator sees unscaled gradients."""

from __future__ import annotations

import math

import torch

from layerwise.engine import LayerwiseOptimizer
from layerwise.policies import SensitivityController

from .helpers import data, loss_fn, mlp, named_groups

ESTIMATOR = {"probes": 2, "quantities": ["grad_norm", "hessian_trace"], "hvp_mode": "vjp"}


def _engine(net, base, every=2, **kwargs):
    controller = SensitivityController("trust_ratio", alpha=1.0, max_rel_stderr=math.inf)
    return LayerwiseOptimizer(
        base, model=net, loss_fn=kwargs.pop("loss", loss_fn), controller=controller,
        recalibrate_every=every, estimator=ESTIMATOR, **kwargs,
    )  # fmt: skip


def _bf16_loss(model, batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return loss_fn(model, batch)


def test_bfloat16_autocast_training_recalibrates():
    net = mlp(dropout=0.0)
    opt = _engine(net, torch.optim.AdamW(named_groups(net), lr=0.01), loss=_bf16_loss)
    for batch in data(4):
        opt.zero_grad()
        _bf16_loss(net, batch).backward()
        opt.step(batch)
    history = opt.history
    assert sorted(set(history["step"])) == [2, 4]
    assert history[["hessian_trace", "grad_norm", "multiplier"]].map(math.isfinite).all().all()
    assert (history["multiplier"] != 1.0).any()


def _scaled_step(net, opt, scaler, batch, poison=False):
    opt.zero_grad()
    scaler.scale(loss_fn(net, batch)).backward()
    if poison:
        next(net.parameters()).grad[0, 0] = math.inf
    scaler.step(opt, batch)
    scaler.update()


def test_gradscaler_skipped_step_skips_recalibration_and_keeps_multipliers():
    net = mlp(dropout=0.0)
    opt = _engine(net, torch.optim.SGD(named_groups(net), lr=0.1))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batches = data(4)
    for batch in batches[:2]:  # recalibration after step 2
        _scaled_step(net, opt, scaler, batch)
    kept, rows = opt.multipliers, len(opt.history)
    assert any(m != 1.0 for m in kept.values())
    _scaled_step(net, opt, scaler, batches[2])  # step 3
    params = [p.detach().clone() for p in net.parameters()]
    _scaled_step(net, opt, scaler, batches[3], poison=True)  # recalibration due, step skipped
    assert all(torch.equal(p, q) for p, q in zip(params, net.parameters(), strict=True))
    assert opt.steps == 3 and opt.multipliers == kept and len(opt.history) == rows
    assert scaler.get_scale() == 2.0**9  # the scaler did see the infinity
    _scaled_step(net, opt, scaler, batches[3])  # the next finite step makes the recalibration
    assert opt.steps == 4 and len(opt.history) == rows + 3


def test_estimator_sees_unscaled_gradients():
    net = mlp(dropout=0.0)
    reports = []
    opt = _engine(net, torch.optim.SGD(named_groups(net), lr=0.1), every=1,
                  callback=lambda record: reports.append(record.report))  # fmt: skip
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    batch = data(1)[0]
    _scaled_step(net, opt, scaler, batch)
    net.zero_grad()
    loss_fn(net, batch).backward()  # the true gradient after the step, at the same params
    true = math.sqrt(sum(float(p.grad.square().sum()) for p in net[0].parameters()))
    assert math.isclose(reports[0]["fc0"].grad_norm, true, rel_tol=1e-5)  # not 4096 times it


def test_fused_optimizer_found_inf_skips_recalibration():
    """Fused Adam handles the scale itself: the scaler calls the engine's step with
    ``found_inf`` set, the base step skips its update, and so does the recalibration."""
    net = mlp(dropout=0.0)
    opt = _engine(net, torch.optim.Adam(named_groups(net), lr=0.01, fused=True))
    assert opt._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batches = data(4)
    for batch in batches[:3]:
        _scaled_step(net, opt, scaler, batch)
    kept = opt.multipliers
    params = [p.detach().clone() for p in net.parameters()]
    _scaled_step(net, opt, scaler, batches[3], poison=True)
    assert all(torch.equal(p, q) for p, q in zip(params, net.parameters(), strict=True))
    last = opt.history[opt.history["step"] == 4]
    assert len(last) == 3 and last["skipped"].all()
    assert last["reason"].str.contains("GradScaler found non-finite gradients").all()
    assert opt.multipliers == kept
    assert not hasattr(opt.base, "found_inf")


def test_non_finite_gradients_without_scaler_skip_the_step_and_the_recalibration():
    net = mlp(dropout=0.0)
    opt = _engine(net, torch.optim.SGD(named_groups(net), lr=0.1), every=1)
    batch = data(1)[0]
    opt.zero_grad()
    loss_fn(net, batch).backward()
    net[0].bias.grad[0] = math.nan
    params = [p.detach().clone() for p in net.parameters()]
    opt.step(batch)
    assert all(torch.equal(p, q) for p, q in zip(params, net.parameters(), strict=True))
    assert opt.steps == 0 and opt.nonfinite_steps == 1
    history = opt.history
    assert history["skipped"].all() and (history["multiplier"] == 1.0).all()
    assert history["reason"].str.startswith("skipped: non-finite gradients").all()
    assert history["hessian_trace"].isna().all()
