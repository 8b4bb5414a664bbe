"""``estimate`` refuses what it cannot measure, with named errors (``ValueError``
subclasses): a loss with no gradient path to the groups (it used to return zeros), a model
on the meta device and an integer parameter named in the groups (they used to get bare
PyTorch messages). A parameter merely unused by a loss that depends on others keeps its
exact zeros."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerwise import sensitivity
from layerwise.sensitivity import (
    MetaTensorError,
    NoGradientPathError,
    NonFloatingParameterError,
    NotMeasurableError,
    estimate,
)

from .cases import batchnorm_train, cross_entropy, mlp


def _ce(model, batch):
    return cross_entropy(model(batch[0]), batch[1])


def _detached(model, batch):
    return _ce(model, batch).detach()


def _no_grad(model, batch):
    with torch.no_grad():
        return _ce(model, batch)


NO_PATH = r"the loss of batch 0 does not depend on any parameter of the groups \['0', '2'\]"
SETTINGS = [
    {"quantities": "grad_norm"},
    {"quantities": "grad_variance"},
    {"quantities": "grad_variance", "variance": "micro_batch", "micro_batches": 2},
    {"quantities": "grad_variance", "variance": "two_batch", "micro_batches": 2},
    {"quantities": "hessian_trace", "hvp_mode": "jvp"},
    {"quantities": "hessian_trace", "hvp_mode": "vjp"},
    {"quantities": "hessian_trace", "isolated": True},
    {"quantities": "all", "tolerance": 0.5},
]


def test_the_errors_are_exported_value_errors():
    for error in (NoGradientPathError, MetaTensorError, NonFloatingParameterError):
        assert issubclass(error, NotMeasurableError) and issubclass(error, ValueError)
        assert error.__name__ in sensitivity.__all__
    assert "NotMeasurableError" in sensitivity.__all__


@pytest.mark.parametrize("loss_fn", [_detached, _no_grad], ids=["detached", "no_grad"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(map(str, s.values())))
def test_a_loss_without_gradient_path_is_refused(loss_fn, settings):
    case = mlp()
    before = {n: p.detach().clone() for n, p in case.model.named_parameters()}
    with pytest.raises(NoGradientPathError, match=NO_PATH):
        estimate(case.model, loss_fn, case.batch, probes=2, **settings)
    for n, p in case.model.named_parameters():  # and the estimate left no trace
        assert torch.equal(p, before[n]) and p.grad is None


def test_a_loss_of_parameters_outside_the_groups_is_refused():
    case = mlp()  # layers "0" and "2"; the loss depends on both, the groups name neither
    spare = nn.Linear(2, 2).double()
    model = nn.ModuleDict({"net": case.model, "spare": spare})
    with pytest.raises(NoGradientPathError, match=r"groups \['spare'\]"):
        estimate(
            model,
            lambda m, b: _ce(m["net"], b),
            case.batch,
            groups={"spare": ["spare.weight", "spare.bias"]},
            probes=2,
        )


def test_the_batch_without_gradient_path_is_named():
    case = mlp()
    x, y = case.batch

    def second_batch_detached(model, batch):
        loss = _ce(model, batch)
        return loss.detach() if batch[0].shape[0] == 4 else loss

    with pytest.raises(NoGradientPathError, match="the loss of batch 1 does not depend"):
        estimate(
            case.model,
            second_batch_detached,
            [(x[:6], y[:6]), (x[6:], y[6:])],
            quantities=["grad_norm", "hessian_trace"],
            probes=2,
        )


@pytest.mark.parametrize("isolated", [False, True])
def test_a_merely_unused_parameter_still_gets_exact_zeros(isolated):
    case = mlp()
    model = nn.ModuleDict({"net": case.model, "spare": nn.Linear(2, 2).double()})
    report = estimate(model, lambda m, b: _ce(m["net"], b), case.batch, probes=3, isolated=isolated)
    spare = report["spare"]
    assert spare.grad_norm == 0 and spare.hessian_trace == 0 and spare.grad_variance == 0
    assert report["net.0"].grad_norm > 0 and report["net.0"].hessian_trace != 0


def test_a_batchnorm_model_in_training_mode_is_measured_as_before():
    case = batchnorm_train()  # micro-batch noise path, running statistics out of the graph
    report = estimate(case.model, case.loss_fn, case.batch, probes=2)
    assert report.is_finite() and all(e.grad_norm > 0 for e in report)


def test_the_check_costs_no_extra_evaluation():
    case = mlp()
    calls = []

    def counted(model, batch):
        calls.append(1)
        return _ce(model, batch)

    estimate(case.model, counted, [case.batch, case.batch], quantities="grad_norm")
    assert len(calls) == 2, "one evaluation per batch, as without the check"


def test_a_model_on_the_meta_device_is_refused_by_name():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(
        MetaTensorError,
        match=r"model Sequential has 4 tensor\(s\) on the meta device, which hold no data "
        r"\('0.weight', '0.bias', '2.weight', '2.bias'\); materialise it first",
    ):
        estimate(model, _ce, (torch.randn(5, 3), torch.randint(0, 2, (5,))))


def test_a_meta_buffer_is_refused_too():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    model[1].running_mean = torch.empty(4, device="meta")
    with pytest.raises(MetaTensorError, match=r"1 tensor\(s\) .* \('1.running_mean'\)"):
        estimate(model, lambda m, b: m(b).square().mean(), torch.randn(5, 3))


class _WithIndex(nn.Module):
    """A linear layer and an integer parameter (a lookup table the optimizer never sees)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).double()
        self.index = nn.Parameter(torch.arange(3), requires_grad=False)

    def forward(self, x):
        return self.lin(x[:, self.index])


def test_an_integer_parameter_named_in_groups_is_refused_by_name():
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    model = _WithIndex()
    with pytest.raises(
        NonFloatingParameterError,
        match=r"groups\['table'\] names parameter 'index' of dtype torch.int64; only "
        r"floating-point parameters have a gradient to measure",
    ):
        estimate(model, _ce, (x, y), groups={"lin": ["lin.weight"], "table": ["index"]})
    report = estimate(model, _ce, (x, y), probes=2)  # left out of the default groups: fine
    assert report.names == ["lin"]
