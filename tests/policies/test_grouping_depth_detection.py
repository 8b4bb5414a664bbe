"""The depth strategy finds layers from module paths: numbered blocks (``layers.3``,
``encoder.layer.11``, ``blocks.0``) in order, the stem first, the head last; ``num_groups``
merges contiguous layers; frozen layers keep their names; ``blocks=`` overrides detection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from layerwise.policies import group_parameters
from tests.policies.models import CASES, SmallCNN, TinyTransformer, mlp

EXPECTED = {
    "mlp": ("layer.0", "layer.1", "head"),
    "cnn": ("stem", "layer.0", "layer.1", "head"),
    "transformer": ("stem", "layer.0", "layer.1", "encoder.norm", "head"),
    "tied": ("stem", "layer.0", "layer.1", "norm"),
    "frozen": ("head",),
}


@pytest.mark.parametrize("case", CASES, ids=repr)
def test_depth_names_on_every_test_model(case):
    assert group_parameters(case.build(), "depth").names == EXPECTED[case.name]


class _Layer(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attention = nn.Linear(dim, dim)
        self.output = nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim))


def bert_like(layers: int = 12, dim: int = 4) -> nn.Module:
    """HF BERT naming: embeddings.*, encoder.layer.{i}.*, pooler.dense, classifier."""
    model = nn.Module()
    model.embeddings = nn.Module()
    model.embeddings.word = nn.Embedding(10, dim)
    model.embeddings.norm = nn.LayerNorm(dim)
    model.encoder = nn.Module()
    model.encoder.layer = nn.ModuleList(_Layer(dim) for _ in range(layers))
    model.pooler = nn.Module()
    model.pooler.dense = nn.Linear(dim, dim)
    model.classifier = nn.Linear(dim, 2)
    return model


class VitLike(nn.Module):
    """timm ViT naming: cls_token, pos_embed, patch_embed.proj, blocks.{i}, norm, head."""

    def __init__(self, depth: int = 3, dim: int = 4) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, dim))
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, 2, stride=2)
        self.blocks = nn.Sequential(*(_Layer(dim) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)


def test_encoder_layer_numbering_of_hf_models():
    groups = group_parameters(bert_like(), "depth")
    layers = tuple(f"layer.{i}" for i in range(12))
    assert groups.names == ("stem", *layers, "pooler.dense", "head")
    assert groups["stem"].param_names == (
        "embeddings.word.weight",
        "embeddings.norm.weight",
        "embeddings.norm.bias",
    )
    assert all(n.startswith("encoder.layer.11.") for n in groups["layer.11"].param_names)
    assert groups["head"].param_names == ("classifier.weight", "classifier.bias")
    assert groups["head"].role == "head" and groups["layer.11"].role == "backbone"


def test_blocks_numbering_with_root_parameters_in_the_stem():
    groups = group_parameters(VitLike(), "depth")
    assert groups.names == ("stem", "layer.0", "layer.1", "layer.2", "norm", "head")
    assert groups["stem"].param_names[:2] == ("cls_token", "pos_embed")
    assert groups.max_depth == 5


def test_sequential_stem_is_one_unit_not_one_layer_per_leaf():
    groups = group_parameters(SmallCNN(), "depth")
    assert groups["stem"].param_names == (
        "stem.0.weight",
        "stem.0.bias",
        "stem.1.weight",
        "stem.1.bias",
    )
    assert all(n.startswith("blocks.1.") for n in groups["layer.1"].param_names)


def test_one_off_numbered_wrapper_is_looked_through_to_its_repeated_layers():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=8, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False)
    model = nn.Sequential(nn.Embedding(5, 8), encoder, nn.LayerNorm(8), nn.Linear(8, 2))
    groups = group_parameters(model, "depth")
    assert groups.names == ("stem", "layer.0", "layer.1", "layer.2", "2", "head")
    assert groups["layer.2"].param_names[0] == "1.layers.2.self_attn.in_proj_weight"


def test_without_blocks_each_module_is_a_layer_and_norms_join_the_layer_before():
    model = nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2)
    )
    groups = group_parameters(model, "depth")
    assert groups.mapping() == {
        "layer.0": ["0.weight", "0.bias", "1.weight", "1.bias"],
        "layer.1": ["3.weight", "3.bias"],
        "head": ["4.weight", "4.bias"],
    }


def test_head_patterns_move_parameters_into_the_last_group():
    groups = group_parameters(TinyTransformer(), "depth", head=[r"^encoder\.norm\.", r"^head\."])
    assert groups.names == ("stem", "layer.0", "layer.1", "head")
    assert groups["head"].param_names[:2] == ("encoder.norm.weight", "encoder.norm.bias")


@pytest.mark.parametrize(
    ("num_groups", "names"),
    [
        (1, ("stem-head",)),
        (2, ("stem-layer.0", "layer.1-head")),
        (3, ("stem-layer.0", "layer.1", "head")),
        (4, ("stem", "layer.0", "layer.1", "head")),
    ],
)
def test_num_groups_merges_contiguous_layers(num_groups, names):
    model = SmallCNN()
    groups = group_parameters(model, "depth", num_groups=num_groups)
    assert groups.names == names
    assert [g.depth for g in groups] == list(range(num_groups))
    flat = [n for g in groups for n in g.param_names]
    assert flat == [n for n, _ in model.named_parameters()]  # order kept


def test_num_groups_names_ranges_of_numbered_layers():
    groups = group_parameters(bert_like(), "depth", num_groups=4)  # 15 layers -> 4, 4, 4, 3
    assert groups.names == ("stem-layer.2", "layer.3-6", "layer.7-10", "layer.11-head")
    assert groups["layer.11-head"].role == "backbone"  # mixed: not every parameter is head


def test_frozen_layers_keep_their_names_and_depth_restarts_at_zero():
    model = SmallCNN()
    model.stem.requires_grad_(False)
    model.blocks[0].requires_grad_(False)
    groups = group_parameters(model, "depth")
    assert groups.names == ("layer.1", "head")
    assert [g.depth for g in groups] == [0, 1]
    assert groups.frozen[:2] == ("stem.0.weight", "stem.0.bias")


class StagedNet(nn.Module):
    """Swin-like nesting: stages.{s}.blocks.{b}; auto-detection sees the stages."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleList()
        for n in (2, 1):
            stage = nn.Module()
            stage.blocks = nn.ModuleList(_Layer(4) for _ in range(n))
            self.stages.append(stage)
        self.head = nn.Linear(4, 2)


@pytest.mark.parametrize(
    ("blocks", "syntax"), [(r"stages\.\d+\.blocks\.\d+", "regex"), ("stages.*.blocks.*", "glob")]
)
def test_blocks_option_sets_the_block_level(blocks, syntax):
    assert group_parameters(StagedNet(), "depth").names == ("layer.0", "layer.1", "head")
    groups = group_parameters(StagedNet(), "depth", blocks=blocks, syntax=syntax)
    assert groups.names == ("layer.0", "layer.1", "layer.2", "head")
    assert groups["layer.2"].param_names[0] == "stages.1.blocks.0.attention.weight"


def test_shared_module_is_grouped_once_under_its_first_path():
    layer = _Layer(4)
    model = nn.Module()
    model.layers = nn.ModuleList([layer, layer, _Layer(4)])  # ALBERT-style sharing
    model.head = nn.Linear(4, 2)
    groups = group_parameters(model, "depth")
    assert groups.names == ("layer.0", "layer.1", "head")
    assert groups["layer.1"].param_names[0] == "layers.2.attention.weight"
    assert groups.tied["layers.1.attention.weight"] == "layers.0.attention.weight"


def test_every_strategy_gives_the_mlp_the_same_head():
    for strategy in ("depth", "module", "role"):
        groups = group_parameters(mlp(), strategy)
        heads = [g for g in groups if g.role == "head"]
        assert [h.param_names for h in heads] == [("4.weight", "4.bias")]
        assert heads[0].depth == groups.max_depth
