"""Every bad input to the grouping API fails with ValueError/TypeError whose message names
the argument and the value, or the parameters and groups concerned."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from layerwise.policies import ParamGroup, ParamGroups, group_parameters
from tests.policies.models import FrozenBackbone, SmallCNN, TiedLM, mlp


def _raises(exc, match, model, *args, **kwargs):
    with pytest.raises(exc, match=match):
        group_parameters(model, *args, **kwargs)


@pytest.mark.parametrize(
    ("strategy", "exc", "match"),
    [
        ("deep", ValueError, r"strategy must be one of .* got 'deep'"),
        ("depth+module", ValueError, r"got 'depth\+module'"),
        ("norm+norm", ValueError, r"got 'norm\+norm'"),
        ("", ValueError, r"got ''"),
        (("depth", 3), TypeError, r"strategy must be a str or a tuple of str, got \('depth', 3\)"),
        (3, TypeError, r"strategy must be a str or a tuple of str, got 3"),
    ],
)
def test_bad_strategy(strategy, exc, match):
    _raises(exc, match, mlp(), strategy)


def test_model_must_be_a_module():
    _raises(TypeError, r"model must be a torch.nn.Module, got list", [nn.Linear(2, 2)])


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"num_groups": 0}, ValueError, r"num_groups must be >= 1, got 0"),
        ({"num_groups": 2.5}, TypeError, r"num_groups must be an int, got 2.5"),
        ({"num_groups": True}, TypeError, r"num_groups must be an int, got True"),
        ({"syntax": "perl"}, ValueError, r"syntax must be one of \('regex', 'glob'\), got 'perl'"),
        ({"head": "("}, ValueError, r"head: invalid regular expression '\('"),
        (
            {"head": 3},
            TypeError,
            r"head must be a pattern \(str\) or a sequence of patterns, got int",
        ),
        ({"head": [3]}, TypeError, r"head: a pattern must be a str, got int"),
        ({"head": []}, ValueError, r"head must name at least one pattern, got \[\]"),
        ({"head": ""}, ValueError, r"head: a pattern must not be empty, got ''"),
        ({"head": "zzz"}, ValueError, r"head: no parameter matches \['zzz'\]"),
        ({"blocks": r"nothing\.\d+"}, ValueError, r"blocks: no module path matches"),
        ({"head": re.compile("fc"), "syntax": "glob"}, ValueError, r"compiled regex 'fc' needs"),
    ],
)
def test_bad_option_values(kwargs, exc, match):
    _raises(exc, match, SmallCNN(), "depth", **kwargs)


@pytest.mark.parametrize(
    ("strategy", "kwargs", "match"),
    [
        (
            "module",
            {"num_groups": 2},
            r"num_groups applies only to the 'depth' strategy, got "
            r"num_groups=2 with strategy='module'",
        ),
        ("depth", {"patterns": {"a": "x"}}, r"patterns applies only to the 'patterns' strategy"),
        ("depth", {"catch_all": "rest"}, r"catch_all applies only to the 'patterns' strategy"),
        (
            "depth",
            {"no_decay": "pos"},
            r"no_decay applies only with the 'norm' strategy, got "
            r"no_decay='pos'",
        ),
        ("patterns", {}, r"strategy 'patterns' needs patterns="),
    ],
)
def test_options_that_do_not_apply(strategy, kwargs, match):
    _raises(ValueError, match, mlp(), strategy, **kwargs)


def test_num_groups_larger_than_the_layers():
    _raises(
        ValueError,
        r"num_groups=9 exceeds the 4 trainable layer\(s\) of this model "
        r"\('stem', 'layer.0', 'layer.1', 'head'\)",
        SmallCNN(),
        num_groups=9,
    )


def test_no_trainable_parameters():
    model = mlp().requires_grad_(False)
    _raises(ValueError, r"no trainable parameters: all 6 are frozen \('0.weight'", model)
    _raises(ValueError, r"model ReLU has no trainable parameters$", nn.ReLU())


def test_role_without_a_head_says_why():
    model = nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4))
    _raises(
        ValueError,
        r"strategy 'role' found no head: the last module owning parameters, "
        r"'1' \(LayerNorm\), is not Linear-like; name it with head=",
        model,
        "role",
    )
    inside = nn.Module()
    inside.blocks = nn.ModuleList(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)) for _ in "ab")
    _raises(ValueError, r"'blocks.1.1', is inside block 'blocks.1'", inside, "role")


def test_role_on_a_tied_head_names_the_tie_and_the_fix():
    _raises(
        ValueError,
        r"the last Linear-like module 'lm_head' owns no parameter of its own "
        r"\('lm_head.weight' is tied to 'embed.weight'\); head=\['lm_head'\] makes the tied "
        r"weight the head",
        TiedLM(),
        "role",
    )
    unknown = r"head: no parameter matches \['lm_hat'\]$"
    _raises(ValueError, unknown, TiedLM(), "role", head="lm_hat")


def test_role_with_a_frozen_head():
    model = FrozenBackbone()
    model.head.requires_grad_(False)
    model.backbone[3].requires_grad_(True)
    _raises(
        ValueError, r"every head parameter is frozen \('head.weight', 'head.bias'\)", model, "role"
    )


@pytest.mark.parametrize(
    ("patterns", "kwargs", "exc", "match"),
    [
        (
            {"w": "weight$"},
            {},
            ValueError,
            r"patterns: no pattern matches 8 trainable parameters: "
            r"'stem.0.bias', .* and 3 more; add a pattern or pass catch_all='rest'",
        ),
        (
            {"w": "weight", "fc": "fc.weight"},
            {"catch_all": "r"},
            ValueError,
            r"group 'fc' is empty: \['fc.weight'\] only match parameters of earlier groups "
            r"\('fc.weight'\)",
        ),
        (
            {"x": "nothing"},
            {"catch_all": "r"},
            ValueError,
            r"group 'x' is empty: \['nothing'\] "
            r"match no parameter",
        ),
        (
            [("a", "fc"), ("a", "stem")],
            {"catch_all": "r"},
            ValueError,
            r"patterns: duplicate group name 'a'",
        ),
        ({"fc": "fc"}, {"catch_all": "fc"}, ValueError, r"catch_all: duplicate group name 'fc'"),
        ({"": "fc"}, {}, ValueError, r"group name must be a non-empty str, got ''"),
        ({}, {}, ValueError, r"patterns must name at least one group, got \{\}"),
        (3, {}, TypeError, r"patterns must be a mapping \{group name: pattern\}, got 3"),
        (
            [("a", "b", "c")],
            {},
            TypeError,
            r"patterns must be a mapping or \(name, pattern\) pairs",
        ),
        ({"a": ["("]}, {}, ValueError, r"patterns\['a'\]: invalid regular expression '\('"),
        ({"a": "fc"}, {"catch_all": ""}, ValueError, r"catch_all must be a non-empty group name"),
    ],
)
def test_bad_patterns(patterns, kwargs, exc, match):
    _raises(exc, match, SmallCNN(), "patterns", patterns=patterns, **kwargs)


def test_pattern_group_of_frozen_or_tied_only_parameters():
    _raises(
        ValueError,
        r"group 'b' is empty: \['backbone'\] only match frozen parameters",
        FrozenBackbone(),
        "patterns",
        patterns={"b": "backbone", "h": "head"},
    )
    _raises(
        ValueError,
        r"group 'out' is empty: \['lm_head'\] only match tied aliases "
        r"\('lm_head.weight'\), grouped by first name",
        TiedLM(),
        "patterns",
        patterns={"out": "lm_head"},
        catch_all="rest",
    )


def test_norm_split_name_clash_is_a_duplicate_group():
    _raises(
        ValueError,
        r"duplicate group name 'a.no_decay'",
        mlp(),
        "patterns+norm",
        patterns={"a": r"^0\.", "a.no_decay": r"^2\."},
        catch_all="rest",
    )


# -- the containers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"name": ""}, ValueError, r"name must be a non-empty str, got ''"),
        ({"param_names": ()}, ValueError, r"group 'g' is empty: param_names=\(\)"),
        ({"param_names": "a.weight"}, TypeError, r"param_names of group 'g' must be a sequence"),
        ({"param_names": ("a", 1)}, TypeError, r"must be non-empty str"),
        ({"depth": -1}, ValueError, r"depth of group 'g' must be an int >= 0, got -1"),
        ({"size": 1.5}, ValueError, r"size of group 'g' must be an int >= 0, got 1.5"),
        ({"role": "neck"}, ValueError, r"role of group 'g' must be one of .*got 'neck'"),
        ({"weight_decay": 1}, TypeError, r"weight_decay of group 'g' must be a bool, got 1"),
    ],
)
def test_param_group_validates_its_fields(kwargs, exc, match):
    fields = {"name": "g", "param_names": ("a",), **kwargs}
    with pytest.raises(exc, match=match):
        ParamGroup(**fields)


def _param_groups(groups, frozen=()):
    params = {n: nn.Parameter(torch.zeros(1)) for n in ("a", "b", "c")}
    return ParamGroups(groups, parameters=params, frozen=frozen)


@pytest.mark.parametrize(
    ("groups", "frozen", "exc", "match"),
    [
        ([], (), ValueError, r"groups must hold at least one ParamGroup, got none"),
        (["a"], (), TypeError, r"groups must hold ParamGroup objects, got str"),
        ([("g", "abc"), ("g", "")], (), ValueError, r"duplicate group name 'g'"),
        (
            [("g", "ab"), ("h", "bc")],
            (),
            ValueError,
            r"parameter 'b' is in two groups, 'g' and 'h'",
        ),
        ([("g", "ab")], (), ValueError, r"trainable parameters in no group: 'c'"),
        ([("g", "abcz")], (), ValueError, r"grouped names are not trainable parameters: 'z'"),
        ([("g", "abc")], ("c",), ValueError, r"frozen parameters are in a group: 'c'"),
    ],
)
def test_param_groups_validate_the_partition(groups, frozen, exc, match):
    built = [ParamGroup(g[0], tuple(g[1]) or ("x",)) if isinstance(g, tuple) else g for g in groups]
    with pytest.raises(exc, match=match):
        _param_groups(built, frozen)


def test_unknown_group_name_lists_the_names():
    groups = group_parameters(mlp())
    with pytest.raises(KeyError, match=r"no group named 'nope'; groups are 'layer.0', 'layer.1'"):
        groups["nope"]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"lr": -1.0}, ValueError, r"lr must be finite and >= 0, got -1.0"),
        ({"lr": float("nan")}, ValueError, r"lr must be finite and >= 0, got nan"),
        ({"lr": "0.1"}, TypeError, r"lr must be a number or None, got str"),
        ({"weight_decay": -0.1}, ValueError, r"weight_decay must be finite and >= 0, got -0.1"),
        ({"weight_decay": True}, TypeError, r"weight_decay must be a number or None, got bool"),
        ({"params": []}, ValueError, r"params is set per group and cannot be passed"),
        ({"name": "x"}, ValueError, r"name is set per group and cannot be passed"),
    ],
)
def test_bad_optimizer_group_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        group_parameters(mlp()).to_optimizer_groups(**kwargs)
