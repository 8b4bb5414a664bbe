"""ParamGroups' views agree with its groups: sequence access by position and name, mapping(),
describe() DataFrame, the printed table with counts and a frozen line, a JSON-able manifest;
and the docstring examples of the grouping modules run."""

from __future__ import annotations

import json

from layerwise.policies import ParamGroup, group_parameters
from tests.policies.models import FrozenBackbone, SmallCNN, TiedLM


def test_sequence_access_by_position_and_name():
    groups = group_parameters(SmallCNN(), "depth")
    assert len(groups) == 4 and groups.names == ("stem", "layer.0", "layer.1", "head")
    assert groups[0] is groups["stem"] and groups[-1] is groups["head"]
    assert [g.name for g in groups[1:3]] == ["layer.0", "layer.1"]
    assert "head" in groups and "neck" not in groups and groups[0] in groups
    assert all(isinstance(g, ParamGroup) for g in groups)
    assert groups.mapping() == {g.name: list(g.param_names) for g in groups}
    assert repr(groups) == (
        "ParamGroups(strategy='depth', groups=['stem', 'layer.0', 'layer.1', 'head'], frozen=0)"
    )


def test_describe_is_one_row_per_group():
    groups = group_parameters(SmallCNN(), "depth+norm")
    frame = groups.describe()
    assert list(frame.columns) == ["name", "parameters", "size", "depth", "role", "weight_decay"]
    assert frame["name"].tolist() == list(groups.names)
    assert (
        frame["size"].sum() == groups.num_params == sum(p.numel() for p in SmallCNN().parameters())
    )
    assert frame["parameters"].tolist() == [len(g.param_names) for g in groups]
    assert frame.set_index("name").loc["head.no_decay", "weight_decay"] == False  # noqa: E712
    assert frame.set_index("name").loc["head", "role"] == "head"


def test_printed_table_shows_counts_and_frozen_line():
    text = str(group_parameters(SmallCNN(), "depth"))
    lines = text.splitlines()
    assert lines[0].split() == ["group", "params", "size", "depth", "role", "decay"]
    assert lines[1].split() == ["stem", "4", "48", "0", "backbone", "yes"]
    assert lines[-2] == "total: 4 groups, 1,323 trainable scalars"
    assert lines[-1] == "frozen (left out): none"

    frozen = str(group_parameters(FrozenBackbone(), "depth")).splitlines()
    assert frozen[-2] == "total: 1 group, 51 trainable scalars"
    assert frozen[-1].startswith("frozen (left out): 6 parameters: 'backbone.0.weight'")
    assert frozen[-1].endswith("and 1 more")

    tied = str(group_parameters(TiedLM(), "depth")).splitlines()
    assert tied[-1] == "tied (grouped once): lm_head.weight -> embed.weight (group stem)"
    as_head = str(group_parameters(TiedLM(), "depth", head="lm_head")).splitlines()
    assert as_head[-1] == "tied (grouped once): lm_head.weight -> embed.weight (group head)"


def test_manifest_is_json_and_complete():
    groups = group_parameters(FrozenBackbone(), "role+norm", no_decay=["zzz"])
    record = json.loads(json.dumps(groups.manifest()))
    assert record["strategy"] == "role+norm"
    assert record["options"]["no_decay"] == ["zzz"]
    assert record["options"]["head_found"] == "the last Linear-like module 'head'"
    assert [g["name"] for g in record["groups"]] == list(groups.names)
    assert {g["name"]: g["parameters"] for g in record["groups"]} == groups.mapping()
    assert record["frozen"] == list(groups.frozen) and len(record["frozen"]) == 6
    assert record["num_params"] == 51
    assert record["groups"][1] == {
        "name": "head.no_decay",
        "depth": 0,
        "role": "head",
        "size": 3,
        "weight_decay": False,
        "parameters": ["head.bias"],
    }


def test_manifest_records_patterns_and_ties():
    groups = group_parameters(TiedLM(), "patterns", patterns={"emb": "embed"}, catch_all="rest")
    record = json.loads(json.dumps(groups.manifest()))
    assert record["options"]["patterns"] == {"emb": ["embed"]}
    assert record["options"]["catch_all"] == "rest"
    assert record["tied"] == {"lm_head.weight": "embed.weight"}
