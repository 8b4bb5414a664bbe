"""``estimate`` on the awkward cases: several batches, tied, frozen and unused parameters,
non-finite losses, dropout, forward-mode failures, dtype casting, generators, progress."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from layerwise.sensitivity import estimate, make_generator

from .cases import cross_entropy, mlp

DT = torch.float64


def _ce(model, batch):
    return cross_entropy(model(batch[0]), batch[1])


def _split(case, cut):
    x, y = case.batch
    return [(x[:cut], y[:cut]), (x[cut:], y[cut:])]


def test_several_batches_are_the_union_weighted_by_size():
    case = mlp()
    parts = _split(case, 3)  # sizes 3 and 7
    union = estimate(case.model, _ce, case.batch, quantities=["grad_norm"])
    both = estimate(case.model, _ce, parts, probes=6, seed=2)
    assert both.cost.examples == 10 and both.cost.batches == 2
    for g in union.names:  # the mean gradient of the union, exactly
        assert both[g].grad_norm == pytest.approx(union[g].grad_norm, rel=1e-12)
    # traces: batch b uses the next probes of the same generator; weights 3/10 and 7/10
    gen = make_generator("cpu", 2)
    singles = [estimate(case.model, _ce, p, probes=6, generator=gen) for p in parts]
    for g in both.names:
        tr = 0.3 * singles[0][g].hessian_trace + 0.7 * singles[1][g].hessian_trace
        se = math.hypot(
            0.3 * singles[0][g].hessian_trace_stderr, 0.7 * singles[1][g].hessian_trace_stderr
        )
        var = 0.3 * singles[0][g].grad_variance + 0.7 * singles[1][g].grad_variance
        assert both[g].hessian_trace == pytest.approx(tr, rel=1e-12)
        assert both[g].hessian_trace_stderr == pytest.approx(se, rel=1e-12)
        assert both[g].grad_variance == pytest.approx(var, rel=1e-12)
        assert both[g].hessian_probes == 12


def test_a_generator_of_batches_and_progress_reports():
    case = mlp()
    calls = []
    report = estimate(
        case.model, _ce, (b for b in _split(case, 5)), probes=4, chunk_size=2,
        progress=lambda done, total: calls.append((done, total)),
    )  # fmt: skip
    assert report.cost.batches == 2
    done = [d for d, _ in calls]
    assert done == sorted(done) and calls[-1][0] == calls[-1][1] == 2 * (4 + 1)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(3, 3, bias=False)
        self.dec = nn.Linear(3, 3)
        self.dec.weight = self.enc.weight  # tied

    def forward(self, x):
        return self.dec(torch.tanh(self.enc(x)))


def test_tied_parameters_are_counted_once_and_aliases_resolve():
    torch.manual_seed(0)
    model = Tied().double()
    x = torch.randn(6, 3, dtype=DT)

    def loss(m, b):
        return m(b).square().mean()

    default = estimate(model, loss, x, probes=2)
    assert default.names == ["enc", "dec"]
    assert default["enc"].num_params == 9 and default["dec"].num_params == 3
    by_alias = estimate(model, loss, x, groups={"w": ["dec.weight", "enc.weight"]}, probes=3)
    by_name = estimate(model, loss, x, groups={"w": ["enc.weight"]}, probes=3)
    assert by_alias["w"].num_params == 9
    assert by_alias["w"].hessian_trace == by_name["w"].hessian_trace
    with pytest.raises(ValueError, match=r"'dec\.weight' is in groups 'a' and 'b'"):
        estimate(model, loss, x, groups={"a": ["enc.weight"], "b": ["dec.weight"]})


def test_frozen_parameters_are_left_out_by_default_and_measured_when_named():
    case = mlp()
    case.model[0].weight.requires_grad_(False)
    default = estimate(case.model, _ce, case.batch, probes=2)
    assert default["0"].num_params == 6  # the bias only
    named = estimate(case.model, _ce, case.batch, groups={"w": ["0.weight"]}, probes=2)
    assert named["w"].num_params == 24 and named["w"].grad_norm > 0
    assert case.model[0].weight.grad is None and not case.model[0].weight.requires_grad


def test_unused_parameters_have_zero_gradient_trace_and_noise():
    case = mlp()

    class WithSpare(nn.Module):
        def __init__(self):
            super().__init__()
            self.net, self.spare = case.model, nn.Linear(2, 2).double()

        def forward(self, x):
            return self.net(x)

    report = estimate(WithSpare(), _ce, case.batch, probes=3)
    spare = report["spare"]
    assert spare.grad_norm == 0 and spare.hessian_trace == 0 and spare.grad_variance == 0
    assert spare.noise_to_signal == 0 and spare.grad_norm_stderr == 0
    assert spare.is_finite()


def test_a_non_finite_loss_is_reported_not_hidden():
    case = mlp()
    x, y = case.batch
    x = x.clone()
    x[0, 0] = float("nan")
    report = estimate(case.model, _ce, (x, y), probes=2)
    assert not report.is_finite()
    assert math.isnan(report["0"].hessian_trace) and math.isnan(report["0"].grad_norm)


def _dropout_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 2)).double()


def test_dropout_masks_are_shared_so_both_modes_agree():
    model = _dropout_model()
    x, y = torch.randn(12, 3, dtype=DT), torch.randint(0, 2, (12,))
    torch.manual_seed(9)
    a = estimate(model, _ce, (x, y), probes=6, chunk_size=2, hvp_mode="jvp")
    torch.manual_seed(9)
    b = estimate(model, _ce, (x, y), probes=6, chunk_size=2, hvp_mode="vjp")
    for g in a.names:
        assert a[g].hessian_trace == pytest.approx(b[g].hessian_trace, rel=1e-10)
        assert a[g].grad_norm == pytest.approx(b[g].grad_norm, rel=1e-12)
    torch.manual_seed(10)  # another global RNG state: other masks, another estimate
    c = estimate(model, _ce, (x, y), probes=6, chunk_size=2, hvp_mode="vjp")
    assert c["0"].grad_norm != a["0"].grad_norm


class _NoForwardMode(torch.autograd.Function):
    """tanh without a forward-mode derivative (double backward works)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.tanh()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


def test_forward_mode_failure_falls_back_to_reverse_mode_under_auto():
    from layerwise.sensitivity import FunctionalLoss, HessianProduct

    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=DT)

    def loss(m, b):
        return _NoForwardMode.apply(m(b)).square().mean()

    f = FunctionalLoss(lin, loss, ["weight", "bias"])
    probes = {n: torch.ones(2, *v.shape, dtype=DT) for n, v in f.values.items()}
    product = HessianProduct(f, f.values, x, mode="jvp", fallback=True)
    fell_back = product(probes)
    assert product.mode == "vjp" and "jvp" in product.fell_back
    exact = HessianProduct(f, f.values, x, mode="vjp", fallback=False)(probes)
    assert all(torch.equal(fell_back[n], exact[n]) for n in exact)
    auto = estimate(lin, loss, x, probes=4)
    assert auto.settings["hvp_mode"] == "vjp" and auto.settings["hvp_fallback"] is None
    with pytest.raises(NotImplementedError, match="jvp"):
        estimate(lin, loss, x, probes=4, hvp_mode="jvp")


def test_dtype_casts_a_float32_model_for_the_estimate():
    case = mlp()
    single = mlp().model.float()
    x32 = case.inputs.float()
    r64 = estimate(case.model, _ce, case.batch, probes=3)
    r32 = estimate(single, _ce, (x32, case.targets), probes=3, dtype=torch.float64)
    assert next(single.parameters()).dtype == torch.float32
    for g in r64.names:  # the float32 copy rounds the parameters only: ~1e-7 apart
        assert r32[g].hessian_trace == pytest.approx(r64[g].hessian_trace, rel=1e-5)
    assert r32.settings["dtype"] == "torch.float64"


def test_seed_reproduces_and_a_given_generator_is_advanced():
    case = mlp()
    a = estimate(case.model, _ce, case.batch, probes=3, seed=4)
    b = estimate(case.model, _ce, case.batch, probes=3, seed=4)
    c = estimate(case.model, _ce, case.batch, probes=3, seed=5)
    assert a.to_dict()["groups"] == b.to_dict()["groups"] != c.to_dict()["groups"]
    gen = make_generator("cpu", 4)
    state = gen.get_state()
    d = estimate(case.model, _ce, case.batch, probes=3, generator=gen)
    assert d["0"].hessian_trace == a["0"].hessian_trace
    assert not torch.equal(gen.get_state(), state)
    assert d.settings["seed"] is None


def test_quantities_not_asked_for_are_none_and_cost_is_recorded():
    case = mlp()
    only = estimate(case.model, _ce, case.batch, quantities="hessian_trace", probes=2)
    est = only["0"]
    assert est.grad_norm is None and est.grad_variance is None and est.noise_to_signal is None
    assert est.hessian_trace is not None and est.param_norm > 0
    assert only.cost.hvps == 2 and only.cost.probes == 2 and only.cost.seconds > 0
    grads = estimate(case.model, _ce, case.batch, quantities=["grad_norm"])
    assert grads["0"].hessian_trace is None and grads.cost.hvps == 0
    assert grads["0"].grad_norm_stderr is None


def test_report_round_trips_through_json():
    import json

    from layerwise.sensitivity import SensitivityReport

    case = mlp()
    report = estimate(case.model, _ce, case.batch, probes=3)
    again = SensitivityReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert again == report
    assert report.settings["groups"] == {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}
    assert "hessian_trace" in str(report)


def test_tolerance_stops_each_batch_early_and_max_probes_caps_it():
    class Diagonal(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([1.0, 2.0, 3.0], dtype=DT))

    def loss(m, b):
        return (torch.tensor([1.0, 2.0, 4.0], dtype=DT) * m.w.square()).sum() * b.mean()

    ones = torch.ones(3, dtype=DT)
    exact = estimate(Diagonal(), loss, ones, probes=64, chunk_size=4, tolerance=0.01)
    assert exact["(root)"].hessian_probes == 4 and exact["(root)"].hessian_trace == 14.0
    case = mlp()
    capped = estimate(
        case.model, _ce, case.batch, probes=4, chunk_size=4, tolerance=1e-9, max_probes=12
    )
    assert [g.hessian_probes for g in capped] == [12, 12] and capped.cost.probes == 12
    isolated = estimate(
        case.model, _ce, case.batch, chunk_size=4, tolerance=1e-9, max_probes=8, isolated=True
    )
    assert isolated.cost.hvps == 16 and isolated.cost.probes == 8


def test_mapping_batches_with_extra_leaves_and_a_batch_size_function():
    case = mlp()
    x, y = case.batch

    def loss(m, b):
        return b["scale"] * cross_entropy(m(b["x"]), b["y"])

    batch = {"x": x, "y": y, "scale": 2.0}
    report = estimate(
        case.model, loss, batch, probes=3, variance="per_example",
        batch_size=lambda b: len(b["y"]),
    )  # fmt: skip
    plain = estimate(case.model, _ce, case.batch, probes=3)
    for g in report.names:
        assert report[g].grad_norm == pytest.approx(2 * plain[g].grad_norm, rel=1e-12)
        assert report[g].grad_variance == pytest.approx(4 * plain[g].grad_variance, rel=1e-10)
        assert report[g].hessian_trace == pytest.approx(2 * plain[g].hessian_trace, rel=1e-10)
