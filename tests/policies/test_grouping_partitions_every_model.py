"""Every strategy and combination, on every test model, partitions the trainable parameters:
each trainable parameter in exactly one group under its first name, frozen ones left out and
reported, tied ones once, sizes and depths consistent."""

from __future__ import annotations

import pytest
import torch

from layerwise.policies import ParamGroups, group_parameters
from tests.policies.models import CASES, ModelCase

STRATEGIES = [
    ("depth", {}),
    ("depth", {"num_groups": 2}),
    ("module", {}),
    ("role", {}),
    ("norm", {}),
    ("patterns", {"patterns": {"weights": r"weight$"}, "catch_all": "rest"}),
    ("depth+norm", {}),
    (("depth", "norm"), {"num_groups": 1}),
    ("module+norm", {}),
    ("norm+role", {}),
    ("patterns+norm", {"patterns": {"weights": r"weight$"}, "catch_all": "rest"}),
]


def _options(case: ModelCase, strategy, options: dict) -> dict:
    # the tied LM has no head of its own (its output layer is the embedding): name one
    if case.name == "tied" and "role" in str(strategy):
        return {**options, "head": r"^norm\."}
    if case.name == "frozen" and "num_groups" in options:  # one trainable layer: the head
        return {**options, "num_groups": 1}
    return options


def assert_partition(groups: ParamGroups, model: torch.nn.Module) -> None:
    named = dict(model.named_parameters())  # first names, each tensor once
    trainable = [n for n, p in named.items() if p.requires_grad]
    frozen = [n for n, p in named.items() if not p.requires_grad]
    grouped = [n for g in groups for n in g.param_names]
    assert len(grouped) == len(set(grouped)), "a parameter is in two groups"
    assert sorted(grouped) == sorted(trainable)
    assert list(groups.frozen) == frozen
    assert len(set(groups.names)) == len(groups)
    for g in groups:
        assert g.param_names, f"empty group {g.name}"
        assert g.size == sum(named[n].numel() for n in g.param_names)
        assert all(
            p is named[n] for p, n in zip(groups.parameters(g.name), g.param_names, strict=True)
        )
    assert sorted({g.depth for g in groups}) == list(range(groups.max_depth + 1))
    assert groups.num_params == sum(named[n].numel() for n in trainable)


@pytest.mark.parametrize("case", CASES, ids=repr)
@pytest.mark.parametrize(("strategy", "options"), STRATEGIES, ids=lambda s: str(s))
def test_strategy_partitions_trainable_parameters(case, strategy, options):
    model = case.build()
    groups = group_parameters(model, strategy, **_options(case, strategy, options))
    assert_partition(groups, model)


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_depth_groups_run_input_to_output(case):
    groups = group_parameters(case.build(), "depth")
    assert [g.depth for g in groups] == list(range(len(groups)))


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_norm_split_halves_each_group_and_flags_no_decay(case):
    model = case.build()
    plain = group_parameters(model, "depth", **_options(case, "depth", {}))
    split = group_parameters(model, "depth+norm")
    for g in split:
        base = g.name.removesuffix(".no_decay")
        assert set(g.param_names) <= set(plain[base].param_names)
        assert g.weight_decay == (not g.name.endswith(".no_decay"))
        assert g.depth == plain[base].depth


def test_combination_spellings_are_one_strategy():
    model = CASES[1].build()
    a = group_parameters(model, "depth+norm")
    b = group_parameters(model, ("norm", "depth"))
    c = group_parameters(model, " norm + depth ")
    assert a.mapping() == b.mapping() == c.mapping()
    assert a.strategy == b.strategy == c.strategy == "depth+norm"
