"""Optimizer groups built from ParamGroups are what torch.optim expects and they train: a few
SGD steps lower the loss on every test model; frozen parameters stay put; no-decay groups get
weight_decay 0 while decay groups get the given (or the optimizer's default) value."""

from __future__ import annotations

import pytest
import torch

from layerwise.policies import group_parameters
from tests.policies.models import CASES, SmallCNN, TiedLM


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread avoids thread contention on shared CPUs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("strategy", ["depth+norm", "role+norm", "module"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_sgd_on_optimizer_groups_lowers_the_loss(case, strategy):
    model = case.build()
    batch = case.batch(torch.Generator().manual_seed(0))
    options = {"head": r"^norm\."} if case.name == "tied" and "role" in strategy else {}
    groups = group_parameters(model, strategy, **options)
    param_groups = groups.to_optimizer_groups(lr=0.1, weight_decay=1e-4, momentum=0.9)
    for k, group in enumerate(param_groups):  # per-group rates, as a layer-wise policy sets them
        group["lr"] *= 0.5 + 0.5 * k / max(len(param_groups) - 1, 1)
    optimizer = torch.optim.SGD(param_groups, lr=1.0)
    assert [g["name"] for g in optimizer.param_groups] == list(groups.names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        first = case.loss(model, batch).item()
    for _ in range(8):
        optimizer.zero_grad()
        case.loss(model, batch).backward()
        optimizer.step()
    with torch.no_grad():
        last = case.loss(model, batch).item()
    assert last < 0.95 * first, (first, last)
    for g in groups:  # every group moved (a conv bias under BatchNorm has no gradient: any)
        assert any(
            not torch.equal(p, before[n])
            for n, p in zip(g.param_names, groups.parameters(g.name), strict=True)
        ), g.name
    for name in groups.frozen:
        assert torch.equal(dict(model.named_parameters())[name], before[name]), name


def test_optimizer_group_dicts():
    groups = group_parameters(SmallCNN(), "depth+norm")
    out = groups.to_optimizer_groups(lr=0.1, weight_decay=0.01, momentum=0.9)
    assert [d["name"] for d in out] == list(groups.names)
    for d, g in zip(out, groups, strict=True):
        assert list(d) == ["params", "name", "lr", "weight_decay", "momentum"]
        assert d["params"] == groups.parameters(g.name)
        assert d["lr"] == 0.1 and d["momentum"] == 0.9
        assert d["weight_decay"] == (0.01 if g.weight_decay else 0.0)
    bare = groups.to_optimizer_groups()
    assert [sorted(d) for d in bare if d["name"] == "stem"] == [["name", "params"]]
    assert all(d["weight_decay"] == 0.0 for d in bare if d["name"].endswith(".no_decay"))


def test_adamw_default_decay_applies_to_decay_groups_only():
    groups = group_parameters(TiedLM(), "depth+norm")
    optimizer = torch.optim.AdamW(groups.to_optimizer_groups(lr=1e-3), weight_decay=0.05)
    decays = {g["name"]: g["weight_decay"] for g in optimizer.param_groups}
    assert decays == {g.name: 0.05 if g.weight_decay else 0.0 for g in groups}
    assert decays["norm.no_decay"] == 0.0 and decays["layer.0"] == 0.05
