"""Bad input gives a clear error that names the argument and the value (and changes nothing)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from layerwise.engine import LayerwiseOptimizer
from layerwise.policies import LayerwiseLR, SensitivityController, schedules
from layerwise.sensitivity import EstimateOptions

from .helpers import data, loss_fn, mlp, named_groups


def _base(net=None):
    net = net if net is not None else mlp()
    return net, torch.optim.SGD(named_groups(net), lr=0.1)


def _make(**kwargs):
    net, base = _base(kwargs.pop("net", None))
    kwargs.setdefault("model", net)
    kwargs.setdefault("loss_fn", loss_fn)
    kwargs.setdefault("controller", SensitivityController("uniform"))
    return LayerwiseOptimizer(kwargs.pop("optimizer", base), **kwargs)


CASES = {
    "not_an_optimizer": (
        dict(optimizer=[torch.zeros(2)]),
        TypeError,
        r"optimizer must be a torch.optim.Optimizer, got \[tensor",
    ),
    "a_model_as_optimizer": (dict(optimizer=nn.Linear(2, 2)), TypeError, "got Linear"),
    "model_not_in_optimizer": (
        dict(model=mlp(seed=1)),
        ValueError,
        "parameter 0 .* of optimizer group 'fc0' is not a parameter of model",
    ),
    "recalibrate_every_zero": (
        dict(recalibrate_every=0),
        ValueError,
        "recalibrate_every must be an integer >= 1, got 0",
    ),
    "recalibrate_every_float": (
        dict(recalibrate_every=2.5),
        TypeError,
        "recalibrate_every must be an integer, got 2.5",
    ),
    "recalibrate_every_bool": (
        dict(recalibrate_every=True),
        TypeError,
        "recalibrate_every must be an integer, got True",
    ),
    "warmup_negative": (
        dict(warmup_steps=-1),
        ValueError,
        "warmup_steps must be an integer >= 0, got -1",
    ),
    "seed_string": (dict(seed="0"), TypeError, "seed must be an integer, got '0'"),
    "controller_int": (
        dict(controller=3),
        TypeError,
        r"controller must be a policies.SensitivityController .*got 3 \(int\)",
    ),
    "controller_dict": (
        dict(controller={"rule": "curvature"}),
        TypeError,
        "controller must be .*got {'rule'",
    ),
    "controller_unknown_rule": (dict(controller="newton"), ValueError, "unknown rule 'newton'"),
    "controller_without_model": (
        dict(model=None),
        ValueError,
        "model and loss_fn are required with a controller, got model=None",
    ),
    "loss_not_callable": (dict(loss_fn="mse"), TypeError, "loss_fn must be callable .* got 'mse'"),
    "model_not_module": (
        dict(model="net"),
        TypeError,
        "model must be a torch.nn.Module, got 'net'",
    ),
    "estimator_unknown": (
        dict(estimator={"probez": 3}),
        ValueError,
        r"estimator: unknown option\(s\) \['probez'\]",
    ),
    "estimator_owned": (
        dict(estimator={"seed": 3}),
        ValueError,
        r"estimator: \['seed'\] are set by the engine",
    ),
    "estimator_not_mapping": (
        dict(estimator=[("probes", 3)]),
        TypeError,
        r"estimator must be a sensitivity.EstimateOptions or a dict of its fields, "
        r"got \[\('probes', 3\)\]",
    ),
    "estimator_bad_value": (
        dict(estimator={"probes": 0}),
        ValueError,
        "probes must be >= 1, got 0",
    ),
    "estimator_bad_quantity": (
        dict(estimator={"quantities": ["hessian"]}),
        ValueError,
        r"quantities has unknown names \['hessian'\]",
    ),
    "estimator_bad_dtype": (
        dict(estimator={"dtype": "float128x"}),
        ValueError,
        "dtype must name a torch dtype such as 'float64', got 'float128x'",
    ),
    "estimator_options_seed": (
        dict(estimator=EstimateOptions(seed=3)),
        ValueError,
        r"estimator: seed=3 is set by the engine",
    ),
    "estimator_generator": (
        dict(estimator={"generator": torch.Generator()}),
        ValueError,
        r"estimator: \['generator'\] are set by the engine",
    ),
    "estimator_runtime_not_callable": (
        dict(estimator={"batch_size": 4}),
        TypeError,
        "estimator: batch_size must be callable, got 4",
    ),
    "callback_type": (
        dict(callback="tensorboard"),
        TypeError,
        "callback must be callable .* got 'tensorboard'",
    ),
    "callback_in_list": (
        dict(callback=[lambda record: None, 3]),
        TypeError,
        r"callback\[1\] must be callable .* got 3",
    ),
    "callback_three_arguments": (
        dict(callback=lambda decision, report, step: None),
        TypeError,
        r"callback must be callable with one argument, callback\(record\).*"
        r"signature \(decision, report, step\)",
    ),
    "schedule_removed": (
        dict(schedule=schedules.constant(1.0)),
        TypeError,
        r"schedule= was removed; .*layerwise.policies.LayerwiseLR\(opt, schedule, factors\)",
    ),
    "factors_removed": (
        dict(factors={"fc0": 1, "fc1": 1, "fc2": 1}),
        TypeError,
        r"factors= was removed; .*layerwise.policies.LayerwiseLR",
    ),
    "history_removed": (
        dict(history="h.csv"),
        TypeError,
        r"history= was removed; .*callback=layerwise.experiments.history_file.HistoryFile\(path\)",
    ),
    "unknown_keyword": (
        dict(recalibrate_evry=3),
        TypeError,
        "unexpected keyword argument 'recalibrate_evry'",
    ),
    "batches_iterator": (dict(batches=iter(data(2))), TypeError, "batches must be re-iterable"),
    "batches_not_iterable": (
        dict(batches=3),
        TypeError,
        "batches must be an iterable of batches, got 3",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_argument_is_named(name):
    kwargs, error, match = CASES[name]
    with pytest.raises(error, match=match):
        _make(**kwargs)


def test_wrapping_twice_is_refused():
    with pytest.raises(TypeError, match="already a LayerwiseOptimizer"):
        LayerwiseOptimizer(_make())


def test_duplicate_group_names_are_refused():
    net = mlp()
    groups = named_groups(net)
    groups[1]["name"] = "fc0"
    with pytest.raises(ValueError, match=r"group names must be unique, got duplicates \['fc0'\]"):
        LayerwiseOptimizer(torch.optim.SGD(groups, lr=0.1))


def test_bad_initial_multiplier_is_refused():
    net = mlp()
    groups = named_groups(net)
    groups[2]["lr_multiplier"] = -1.0
    with pytest.raises(
        ValueError,
        match=r"param_groups\[2\]\['lr_multiplier'\] must be a finite number > 0, got -1.0",
    ):
        LayerwiseOptimizer(torch.optim.SGD(groups, lr=0.1))


def test_missing_batch_at_a_due_recalibration_is_named():
    opt = _make(recalibrate_every=1)
    with pytest.raises(ValueError, match="batch: a recalibration is due after step 1 but step"):
        opt.step()


class _Rogue:
    """A controller that returns what it is told to (to test the engine's own checks)."""

    def __init__(self, multipliers):
        self.out = multipliers

    def update(self, report, *, step):
        from layerwise.policies.controller import Decision

        return Decision(step, self.out)

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


@pytest.mark.parametrize(
    ("multipliers", "match"),
    [
        ({"fc0": math.nan}, "multiplier of group 'fc0' must be a finite number > 0, got nan"),
        ({"fc0": 0.0}, "multiplier of group 'fc0' must be a finite number > 0, got 0.0"),
        ({"ghost": 1.0}, "multiplier for group 'ghost', which the optimizer does not have"),
    ],
)
def test_controller_output_is_checked(multipliers, match):
    net = mlp()
    opt = _make(
        net=net, controller=_Rogue(multipliers), recalibrate_every=1, estimator={"probes": 1}
    )
    batch = data(1)[0]
    loss_fn(net, batch).backward()
    with pytest.raises(ValueError, match=match):
        opt.step(batch)
    assert opt.multipliers == {"fc0": 1.0, "fc1": 1.0, "fc2": 1.0}


def test_observe_validation_rejects_non_numbers():
    opt = _make()
    with pytest.raises(TypeError, match="value must be a real number, got 'low'"):
        opt.observe_validation("low")
    with pytest.raises(ValueError, match=r"value must be a scalar, got a tensor of shape \(2,\)"):
        opt.observe_validation(torch.zeros(2))


def test_add_param_group_with_duplicate_name_is_refused_and_undone():
    opt = _make()
    extra = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="duplicates"):
        opt.add_param_group({"params": [extra], "name": "fc0"})
    assert opt.group_names == ["fc0", "fc1", "fc2"] and len(opt.param_groups) == 3


def test_layerwise_lr_on_the_engine_refuses_groups_added_after_it():
    opt = _make(controller=None)
    sched = LayerwiseLR(opt, schedules.constant(1.0))
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))]})
    opt.step()
    with pytest.raises(ValueError, match="build a new LayerwiseLR after add_param_group"):
        sched.step()


@pytest.mark.parametrize("name", ["callback_type", "controller_int", "batches_iterator"])
def test_failed_construction_leaves_the_optimizer_untouched(name):
    kwargs, error, _ = CASES[name]
    net = mlp()
    base = torch.optim.SGD(
        [{"params": list(m.parameters())} for m in net if list(m.parameters())], lr=0.1
    )
    before = [dict(g) for g in base.param_groups]
    with pytest.raises(error):
        _make(net=net, optimizer=base, **kwargs)
    assert [dict(g) for g in base.param_groups] == before
