"""What the module, role, norm and patterns strategies put where: module paths, the default
and the named head, the no-decay split (norm weights and all biases), first-match-wins
patterns in regex and glob syntax, and tied parameters grouped once."""

from __future__ import annotations

import re

import pytest
import torch

from layerwise.policies import group_parameters
from tests.policies.models import FrozenBackbone, SmallCNN, TiedLM, TinyTransformer, mlp


def test_module_strategy_names_groups_by_module_path():
    groups = group_parameters(TinyTransformer(), "module")
    assert groups.names[:3] == ("(root)", "embed", "encoder.layers.0.self_attn")
    assert groups["(root)"].param_names == ("pos",)
    assert groups["encoder.layers.0.self_attn"].param_names == (
        "encoder.layers.0.self_attn.in_proj_weight",
        "encoder.layers.0.self_attn.in_proj_bias",
    )
    assert groups["head"].role == "head"
    assert groups["encoder.layers.1.norm2"].depth == groups["encoder.layers.1.linear1"].depth == 2


@pytest.mark.parametrize(
    ("build", "head"),
    [
        (mlp, ("4.weight", "4.bias")),
        (SmallCNN, ("fc.weight", "fc.bias")),
        (TinyTransformer, ("head.weight", "head.bias")),
        (FrozenBackbone, ("head.weight", "head.bias")),
        (lambda: TiedLM(head_bias=True), ("lm_head.bias",)),
    ],
)
def test_role_default_head_is_the_last_linear_module(build, head):
    groups = group_parameters(build(), "role")
    assert groups["head"].param_names == head
    assert groups["head"].role == "head" and groups["head"].depth == groups.max_depth


def test_role_with_frozen_backbone_has_only_the_head():
    groups = group_parameters(FrozenBackbone(), "role")
    assert groups.names == ("head",)
    assert len(groups.frozen) == 6


@pytest.mark.parametrize(
    ("head", "syntax"),
    [(r"^blocks\.1\.|^fc\.", "regex"), (["blocks.1", "fc"], "glob"), (re.compile(r"^fc"), "regex")],
)
def test_role_head_by_patterns(head, syntax):
    groups = group_parameters(SmallCNN(), "role", head=head, syntax=syntax)
    wanted = [n for n, _ in SmallCNN().named_parameters() if n.startswith(("blocks.1.", "fc."))]
    if isinstance(head, re.Pattern):
        wanted = ["fc.weight", "fc.bias"]
    assert list(groups["head"].param_names) == wanted
    assert groups.names == ("backbone", "head")


def test_norm_split_is_norm_weights_and_all_biases():
    model = TinyTransformer()
    groups = group_parameters(model, "norm")
    free = set(groups["no_decay"].param_names)
    for name, _ in model.named_parameters():
        last = name.rsplit(".", 1)[-1]
        expected = "norm" in name or last.endswith("bias")
        assert (name in free) == expected, name
    assert "encoder.layers.0.self_attn.in_proj_bias" in free  # a bias by its "_bias" suffix
    assert [g.depth for g in groups] == [0, 0]  # no depth order without a base strategy


def test_norm_split_of_a_cnn_exempts_batchnorm_and_biases_only():
    groups = group_parameters(SmallCNN(), "norm")
    decay = groups["decay"].param_names
    assert all(n.endswith("weight") and ".bn" not in n and "stem.1" not in n for n in decay)
    assert "blocks.1.shortcut.1.weight" in groups["no_decay"].param_names  # BatchNorm in a shortcut


def test_no_decay_patterns_extend_the_split():
    groups = group_parameters(TinyTransformer(), "depth+norm", no_decay=r"^pos$")
    assert groups["stem.no_decay"].param_names == ("pos",)
    assert groups["stem"].param_names == ("embed.weight",)


def test_patterns_first_match_wins_in_order():
    patterns = {"w": r"weight$", "fc": r"^fc\."}
    groups = group_parameters(SmallCNN(), "patterns", patterns=patterns, catch_all="rest")
    assert groups.names == ("w", "fc", "rest")
    assert groups["fc"].param_names == ("fc.bias",)  # fc.weight went to "w", listed first
    assert "fc.weight" in groups["w"].param_names
    names = [n for n, _ in SmallCNN().named_parameters()]
    assert list(groups["rest"].param_names) == [
        n for n in names if not n.endswith("weight") and n != "fc.bias"
    ]


def test_patterns_lists_pairs_globs_and_catch_all():
    pairs = [("stem", ["stem.*"]), ("head", "fc"), ("bn", ["blocks.*.bn*", "*shortcut.1*"])]
    groups = group_parameters(
        SmallCNN(), "patterns", patterns=pairs, catch_all="rest", syntax="glob"
    )
    assert groups.names == ("stem", "head", "bn", "rest")
    assert groups["head"].param_names == ("fc.weight", "fc.bias")  # glob "fc" matches prefix fc
    assert "blocks.1.shortcut.1.bias" in groups["bn"].param_names
    assert groups["rest"].param_names == (
        "blocks.0.conv1.weight",
        "blocks.0.conv2.weight",
        "blocks.1.conv1.weight",
        "blocks.1.conv2.weight",
        "blocks.1.shortcut.0.weight",
    )
    assert groups["head"].role == "head" and groups["rest"].role == "backbone"
    assert groups["head"].depth == groups.max_depth == 2  # stem 0, rest/bn 1 (blocks), head 2


def test_empty_catch_all_is_dropped():
    groups = group_parameters(mlp(), "patterns", patterns={"all": "."}, catch_all="rest")
    assert groups.names == ("all",)


def test_patterns_with_norm_split_each_pattern_group():
    groups = group_parameters(
        mlp(), "patterns+norm", patterns={"body": r"^[02]\."}, catch_all="top"
    )
    assert groups.names == ("body", "body.no_decay", "top", "top.no_decay")


def test_tied_parameters_appear_once_under_their_first_name():
    model = TiedLM()
    assert model.lm_head.weight is model.embed.weight
    for strategy in ("depth", "module", "norm", "depth+norm"):
        groups = group_parameters(model, strategy)
        flat = [n for g in groups for n in g.param_names]
        assert flat.count("embed.weight") == 1 and "lm_head.weight" not in flat
        assert groups.tied == {"lm_head.weight": "embed.weight"}
    # torch refuses a parameter in two groups; these groups are accepted
    torch.optim.SGD(groups.to_optimizer_groups(lr=0.1), lr=0.1)


@pytest.mark.parametrize("head", ["lm_head", r"^lm_head\.", ["lm_head.weight"]])
@pytest.mark.parametrize("strategy", ["role", "depth", "depth+norm"])
def test_a_tied_head_named_by_its_alias_takes_the_shared_weight(strategy, head):
    model = TiedLM()
    groups = group_parameters(model, strategy, head=head)
    assert groups["head"].param_names == ("embed.weight",)
    assert groups["head"].role == "head" and groups[-1].name.startswith("head")
    assert groups.tied == {"lm_head.weight": "embed.weight"}
    flat = [n for g in groups for n in g.param_names]
    assert sorted(flat) == sorted(n for n, _ in model.named_parameters())  # once each
    assert "tied: 'lm_head.weight' is 'embed.weight'" in groups.options["head_found"]
    if strategy == "depth":
        assert groups.names == ("layer.0", "layer.1", "norm", "head")  # no stem left
    torch.optim.SGD(groups.to_optimizer_groups(lr=0.1), lr=0.1)


def test_role_on_a_tied_model_with_a_named_head():
    groups = group_parameters(TiedLM(), "role", head="norm")
    assert groups.mapping()["head"] == ["norm.weight", "norm.bias"]
