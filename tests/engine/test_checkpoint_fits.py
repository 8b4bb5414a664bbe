"""A checkpoint that does not fit the wrapped optimizer is refused before anything changes:
another optimizer class, other parameter shapes under the same names, other group sizes,
other per-parameter state keys, an older format."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from layerwise.engine import LayerwiseOptimizer
from layerwise.policies import SensitivityController

from .helpers import data, loss_fn, mlp, named_groups

ESTIMATOR = {"probes": 2, "quantities": ["grad_norm"]}


def _engine(net, make=lambda groups: torch.optim.Adam(groups, lr=0.01)):
    controller = SensitivityController("trust_ratio", max_rel_stderr=math.inf)
    return LayerwiseOptimizer(
        make(named_groups(net)), model=net, loss_fn=loss_fn, controller=controller,
        recalibrate_every=2, estimator=ESTIMATOR,
    )  # fmt: skip


def _trained(net, opt, steps=3):
    for batch in data(steps):
        opt.zero_grad()
        loss_fn(net, batch).backward()
        opt.step(batch)
    return opt


def _same(a, b) -> bool:
    """Deep equality of state dicts, tensors compared exactly."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return a == b or (a != a and b != b)  # NaN in history rows


def _refused(opt, state, match):
    """``load_state_dict(state)`` raises a ValueError matching ``match`` and changes nothing:
    the engine's state dict (base optimizer's state, controller, history, counts) and the
    base optimizer's own."""
    before, base_before = copy.deepcopy(opt.state_dict()), copy.deepcopy(opt.base.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(state)
    assert _same(opt.state_dict(), before)
    assert _same(opt.base.state_dict(), base_before)


SGD = lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9)  # noqa: E731


@pytest.mark.parametrize("stepped", [False, True], ids=["fresh", "stepped"])
def test_an_sgd_checkpoint_is_refused_by_an_adam_engine(stepped):
    saved = _trained(mlp(), _engine(mlp(), SGD)).state_dict()
    net = mlp()
    opt = _engine(net)
    if stepped:
        _trained(net, opt)
    _refused(opt, saved, r"state_dict was saved from a torch.optim.sgd.SGD optimizer; this "
                         r"engine wraps a torch.optim.adam.Adam")  # fmt: skip


def _wide_mlp() -> nn.Module:
    """The layers of :func:`mlp` with the same names, the hidden layers wider."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Dropout(0.1), nn.Linear(12, 8),
                         nn.Tanh(), nn.Linear(8, 3))  # fmt: skip


def test_same_names_with_other_shapes_are_refused():
    net = _wide_mlp()
    saved = _trained(net, _engine(net)).state_dict()
    opt = _engine(mlp())
    _refused(opt, saved, r"parameter 0 of group 'fc0' has shape \(12, 6\) in the state_dict "
                         r"and \(10, 6\) here")  # fmt: skip


def test_other_group_sizes_are_refused():
    net = mlp()
    saved = _trained(net, _engine(net)).state_dict()
    other = mlp()
    groups = named_groups(other)
    groups[2]["params"] = groups[2]["params"][:1]  # fc2 without its bias
    opt = LayerwiseOptimizer(torch.optim.Adam(groups, lr=0.01))
    saved = {**saved, "layerwise": {**saved["layerwise"], "recalibrator": None}}
    _refused(opt, saved, r"group 'fc2' has 2 parameters in the state_dict \(2 shapes recorded\)"
                         r" and 1 here")  # fmt: skip


def test_other_state_keys_are_refused():
    """An amsgrad checkpoint into a stepped Adam without amsgrad, and a state entry that lost
    a key (into an optimizer that has that parameter's state)."""
    net = mlp()
    amsgrad = _trained(net, _engine(net, lambda g: torch.optim.Adam(g, lr=0.01, amsgrad=True)))
    net = mlp()
    opt = _trained(net, _engine(net))
    _refused(opt, amsgrad.state_dict(), r"state of parameter 0 of group 'fc0' has keys "
             r"\['exp_avg', 'exp_avg_sq', 'max_exp_avg_sq', 'step'\] in the state_dict and "
             r"\['exp_avg', 'exp_avg_sq', 'step'\] here")  # fmt: skip
    damaged = copy.deepcopy(opt.state_dict())
    del damaged["state"][3]["exp_avg_sq"]
    _refused(opt, damaged, r"parameter 1 of group 'fc1' has keys \['exp_avg', 'step'\]")


def test_state_for_an_unlisted_parameter_and_malformed_entries_are_refused():
    net = mlp()
    opt = _trained(net, _engine(net))
    state = copy.deepcopy(opt.state_dict())
    state["state"][17] = {"step": torch.tensor(1.0)}
    _refused(opt, state, "holds an entry for parameter id 17, which no group of the state_dict")
    state = copy.deepcopy(opt.state_dict())
    state["state"][0] = [1, 2]
    _refused(opt, state, r"state of parameter 0 of group 'fc0' must be a mapping, got \[1, 2\]")
    state = copy.deepcopy(opt.state_dict())
    state["layerwise"]["base"] = {"class": "torch.optim.adam.Adam"}
    _refused(opt, state, r"\['base'\] must be a mapping with keys class, shapes")
    state = copy.deepcopy(opt.state_dict())
    state["layerwise"]["base"]["shapes"] = state["layerwise"]["base"]["shapes"][:2]
    _refused(opt, state, r"\['shapes'\] must list the parameter shapes of 3 groups")


def test_the_checkpoint_records_the_class_and_the_shapes():
    net = mlp()
    base = _engine(net).state_dict()["layerwise"]["base"]
    assert base == {
        "class": "torch.optim.adam.Adam",
        "shapes": [[[10, 6], [10]], [[8, 10], [8]], [[3, 8], [3]]],
    }


def test_a_format_2_checkpoint_is_refused_with_its_version_named():
    """Format 2 (before this check) records neither class nor shapes; it is refused, and
    its base optimizer's part still loads on its own, as the message says."""
    net = mlp()
    state = _trained(net, _engine(net)).state_dict()
    old = copy.deepcopy(state)
    old["layerwise"]["version"] = 2
    for key in ("base", "nonfinite"):
        del old["layerwise"][key]
    del old["layerwise"]["settings"]["max_nonfinite_steps"]
    fresh = _engine(mlp())
    match = r"has version 2, this engine reads version 3 \(format 2 records neither the base"
    _refused(fresh, old, match + r" optimizer's class nor the parameter shapes")
    fresh.base.load_state_dict({k: v for k, v in old.items() if k != "layerwise"})
    assert _same(fresh.base.state_dict()["state"], state["state"])
