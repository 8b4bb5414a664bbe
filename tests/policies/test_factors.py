"""Static factors: exact layer-decay and discriminative values, validation of explicit maps."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

from layerwise import policies
from layerwise.policies import (
    ParamGroup,
    ParamGroups,
    discriminative,
    layer_decay,
    validate_factors,
)


def _groups(*triples: tuple[str, int, str]) -> ParamGroups:
    """A ParamGroups of one scalar parameter per (name, depth, role) triple."""
    params = {f"{name}.w": nn.Parameter(torch.zeros(1)) for name, _, _ in triples}
    groups = [ParamGroup(n, (f"{n}.w",), depth=d, role=r, size=1) for n, d, r in triples]
    return ParamGroups(groups, parameters=params)


def _deep_mlp(depth: int) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(3, 3) for _ in range(depth)])


@pytest.mark.parametrize("decay", [1.0, 0.9, 0.65, 0.5, 1e-3])
@pytest.mark.parametrize("depth", [1, 2, 6])
def test_layer_decay_is_decay_to_the_distance_from_the_output(decay, depth):
    groups = policies.group_parameters(_deep_mlp(depth))
    factors = layer_decay(groups, decay)
    assert list(factors) == list(groups.names)
    for g in groups:
        want = 1.0 if g.role == "head" else decay ** (groups.max_depth - g.depth)
        assert factors[g.name] == want
    assert factors["head"] == 1.0
    assert all(type(f) is float for f in factors.values())


def test_layer_decay_clips_below_at_min_factor():
    groups = policies.group_parameters(_deep_mlp(5))  # depths 0..4
    factors = layer_decay(groups, 0.5, min_factor=0.2)
    assert list(factors.values()) == [0.2, 0.2, 0.25, 0.5, 1.0]


def test_layer_decay_is_monotone_in_depth():
    groups = policies.group_parameters(_deep_mlp(8))
    values = list(layer_decay(groups, 0.7).values())
    assert all(a < b for a, b in itertools.pairwise(values))


def test_layer_decay_gives_one_to_every_head_group_and_equal_factors_at_equal_depth():
    groups = _groups(
        ("stem", 0, "backbone"),
        ("stem.no_decay", 0, "backbone"),
        ("mid", 1, "backbone"),
        ("head", 2, "head"),
        ("aux_head", 1, "head"),  # a head that is not the deepest group still gets 1
    )
    factors = layer_decay(groups, 0.5)
    assert factors == {
        "stem": 0.25,
        "stem.no_decay": 0.25,
        "mid": 0.5,
        "head": 1.0,
        "aux_head": 1.0,
    }


def test_layer_decay_on_norm_split_groups_of_a_cnn():
    from tests.policies.models import SmallCNN

    groups = policies.group_parameters(SmallCNN(), "depth+norm")
    factors = layer_decay(groups, 0.8)
    for g in groups:
        assert factors[g.name] == 0.8 ** (groups.max_depth - g.depth)


def test_layer_decay_refuses_a_factor_that_underflows_to_zero():
    groups = _groups(("deep", 0, "backbone"), ("head", 2000, "head"))
    with pytest.raises(ValueError, match=r"factor of group 'deep' underflows to 0.*min_factor > 0"):
        layer_decay(groups, 0.5)
    assert layer_decay(groups, 0.5, min_factor=1e-6) == {"deep": 1e-6, "head": 1.0}


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"decay": 0.0}, ValueError, r"decay must lie in \(0, 1\], got 0\.0"),
        ({"decay": 1.5}, ValueError, r"decay must lie in \(0, 1\], got 1\.5"),
        ({"decay": float("nan")}, ValueError, r"decay must be finite, got nan"),
        ({"decay": True}, TypeError, r"decay must be a real number, got True"),
        ({"decay": 0.5, "min_factor": -0.1}, ValueError, r"min_factor must lie in \[0, 1\]"),
        ({"decay": 0.5, "min_factor": 2}, ValueError, r"min_factor must lie in \[0, 1\], got 2"),
    ],
)
def test_layer_decay_rejects_bad_arguments_naming_them(kwargs, error, message):
    with pytest.raises(error, match=message):
        layer_decay(policies.group_parameters(_deep_mlp(2)), **kwargs)


@pytest.mark.parametrize("function", [layer_decay, discriminative])
def test_group_factors_need_a_param_groups(function):
    with pytest.raises(TypeError, match=r"groups must be a ParamGroups"):
        function(["a", "b"], 0.5)


def test_discriminative_is_role_based():
    groups = _groups(("a", 0, "backbone"), ("b", 1, "backbone"), ("h", 2, "head"))
    assert discriminative(groups) == {"a": 1.0, "b": 1.0, "h": 10.0}
    assert discriminative(groups, head=3, backbone=0.1) == {"a": 0.1, "b": 0.1, "h": 3.0}
    assert list(discriminative(policies.group_parameters(_deep_mlp(3))).values()) == [1, 1, 10]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"head": 0.0}, r"head must lie in \(0, inf\), got 0\.0"),
        ({"backbone": -1.0}, r"backbone must lie in \(0, inf\), got -1\.0"),
        ({"head": math.inf}, r"head must be finite, got inf"),
    ],
)
def test_discriminative_rejects_bad_factors_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        discriminative(_groups(("a", 0, "backbone"), ("h", 1, "head")), **kwargs)


def test_validate_factors_returns_plain_floats_in_group_order():
    groups = _groups(("a", 0, "backbone"), ("b", 1, "backbone"), ("h", 2, "head"))
    factors = validate_factors(groups, {"h": 2, "a": 0.5, "b": 1.0})
    assert list(factors.items()) == [("a", 0.5), ("b", 1.0), ("h", 2.0)]
    assert all(type(v) is float for v in factors.values())
    assert json.loads(json.dumps(factors)) == factors


def test_validate_factors_fills_missing_groups_with_the_default_only_when_given():
    with pytest.raises(ValueError, match=r"no factor for group\(s\) \['a', 'c'\] and no default"):
        validate_factors(["a", "b", "c"], {"b": 2.0})
    assert validate_factors(["a", "b", "c"], {"b": 2.0}, default=1) == {
        "a": 1.0,
        "b": 2.0,
        "c": 1.0,
    }


def test_validate_factors_takes_names_from_an_optimizer():
    w, v = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [w], "name": "body"}, {"params": [v]}], lr=0.1)
    assert validate_factors(opt, {"body": 0.5, "group1": 1.0}) == {"body": 0.5, "group1": 1.0}


@pytest.mark.parametrize(
    ("names", "mapping", "kwargs", "error", "message"),
    [
        (["a"], {"a": 1.0, "z": 2.0}, {}, ValueError, r"unknown group\(s\) \['z'\]; known groups"),
        (
            ["a"],
            {"a": 0.0},
            {},
            ValueError,
            r"factor of group 'a' must lie in \(0, inf\), got 0\.0",
        ),
        (["a"], {"a": -2}, {}, ValueError, r"factor of group 'a' must lie in \(0, inf\), got -2"),
        (["a"], {"a": math.nan}, {}, ValueError, r"factor of group 'a' must be finite, got nan"),
        (["a"], {"a": math.inf}, {}, ValueError, r"factor of group 'a' must be finite, got inf"),
        (["a"], {"a": "2"}, {}, TypeError, r"factor of group 'a' must be a real number, got '2'"),
        (["a"], {"a": True}, {}, TypeError, r"factor of group 'a' must be a real number, got True"),
        (["a", "b"], {"a": 1.0}, {"default": 0}, ValueError, r"default must lie in \(0, inf\)"),
        (["a"], [("a", 1.0)], {}, TypeError, r"mapping must be a mapping"),
        (["a", "a"], {"a": 1.0}, {}, ValueError, r"group names must be unique.*\['a'\]"),
        ([3], {}, {}, TypeError, r"group names must be non-empty strings, got 3"),
        ("ab", {}, {}, TypeError, r"groups_or_names must be a ParamGroups"),
    ],
)
def test_validate_factors_rejects_bad_input_saying_what(names, mapping, kwargs, error, message):
    with pytest.raises(error, match=message):
        validate_factors(names, mapping, **kwargs)
