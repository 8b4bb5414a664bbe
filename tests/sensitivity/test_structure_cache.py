"""The per-model structure cache: reused while the tree is unchanged, rebuilt on any change
that the estimate depends on, and the estimate after a change equals that of a fresh model."""

from __future__ import annotations

import collections
import copy
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from layerwise.sensitivity import estimate
from layerwise.sensitivity.structure import GROUPS_KEPT, model_structure


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch[0]), batch[1])


BATCH = (torch.randn(16, 4, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 3)


def test_unchanged_tree_reuses_the_entry():
    net = _net()
    first = model_structure(net)
    assert model_structure(net) is first
    assert first.param_names == ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias")
    assert first.batch_statistics and first.batch_stat_modules == {"1"}
    assert first.modules == list(net.modules())
    assert first.param_modules == [net[0], net[1], net[3]]


CHANGES = {
    "submodule replaced": lambda n: n.__setitem__(3, nn.Linear(6, 3)),
    "parameter replaced": lambda n: setattr(n[0], "bias", nn.Parameter(torch.zeros(6))),
    "parameter frozen": lambda n: n[0].weight.requires_grad_(False),
    "eval mode": lambda n: n.eval(),
    "dtype in place (.data)": lambda n: n.double(),
    "shape in place (.data)": lambda n: setattr(n[3].bias, "data", torch.zeros(2)),
    "buffer replaced": lambda n: setattr(n[1], "running_mean", torch.ones(6)),
    "running stats off": lambda n: setattr(n[1], "track_running_stats", False),
    "parameter added": lambda n: n[2].register_parameter("extra", nn.Parameter(torch.ones(1))),
    "parameter removed": lambda n: setattr(n[3], "bias", None),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_rebuilds_the_entry(change):
    net = _net()
    first = model_structure(net)
    CHANGES[change](net)
    assert model_structure(net) is not first


@pytest.mark.parametrize("change", ["parameter frozen", "eval mode", "dtype in place (.data)"])
def test_estimate_after_a_change_equals_a_fresh_models(change):
    net = _net()
    estimate(net, _loss, BATCH, probes=4, seed=0)  # fills the cache
    CHANGES[change](net)
    fresh = copy.deepcopy(net)  # a new model: no cache entry
    batch = (BATCH[0].to(next(net.parameters()).dtype), BATCH[1])
    ours = estimate(net, _loss, batch, probes=4, seed=0)
    theirs = estimate(fresh, _loss, batch, probes=4, seed=0)
    assert ours.names == theirs.names
    assert [g.to_dict() for g in ours] == [g.to_dict() for g in theirs]
    assert ours.settings["groups"] == theirs.settings["groups"]


def test_a_lazy_module_is_refused_as_before_and_measured_once_materialised():
    torch.manual_seed(0)
    net = nn.Sequential(nn.LazyLinear(6), nn.Tanh(), nn.Linear(6, 3))
    with pytest.raises(ValueError, match="uninitialized parameter"):
        estimate(net, _loss, BATCH, probes=2, seed=0)
    net(BATCH[0])  # materialises the parameters in place: the same objects, now with shapes
    ours = estimate(net, _loss, BATCH, probes=2, seed=0)
    theirs = estimate(copy.deepcopy(net), _loss, BATCH, probes=2, seed=0)
    assert [g.to_dict() for g in ours] == [g.to_dict() for g in theirs]
    assert ours["0"].num_params == 4 * 6 + 6


def test_groups_are_cached_per_mapping_and_bad_ones_still_raise():
    net = _net()
    s = model_structure(net)
    a = s.groups(net, {"a": ["0.weight"], "b": ["3.bias"]})
    assert s.groups(net, {"a": ["0.weight"], "b": ["3.bias"]}) is a
    assert s.groups(net, {"a": ("0.weight",), "b": ["3.weight"]}) is not a
    for _ in range(2):
        with pytest.raises(ValueError, match="unknown parameters"):
            s.groups(net, {"a": ["nope"]})
    for i in range(3 * GROUPS_KEPT):
        s.groups(net, {f"g{i}": ["0.weight"]})
    assert len(s._groups) <= GROUPS_KEPT


def test_the_cache_keeps_no_model_alive_even_one_a_submodule_points_back_to():
    net = _net()
    net[0].owner = [net]  # a reference cycle through a submodule
    estimate(net, _loss, BATCH, probes=2, seed=0)
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None


# -- the inputs kept between the cotangents of one forward pass (outer_norms memo) ----------


def _conv_term(size: int, gen: torch.Generator):
    from layerwise.sensitivity.layer_terms import spec_for

    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(size, 3, 6, 6, generator=gen)
    spec = spec_for(conv, x, size)
    saved = spec.save(conv, x)
    return conv, spec, saved


@pytest.mark.parametrize("budget", [None, 1])  # 1: nothing may be kept beyond MIN_BUDGET
def test_kept_inputs_give_the_very_same_norms_as_a_fresh_computation(budget):
    from layerwise.sensitivity import outer_norms

    gen = torch.Generator().manual_seed(3)
    size = 9
    conv, spec, saved = _conv_term(size, gen)
    lin = nn.Linear(5, 2)
    xl = torch.randn(size, 5, generator=gen)
    memos: dict[str, dict] = collections.defaultdict(dict)  # one per parameter and chunking
    for _ in range(3):  # three cotangents: new output gradients, the same inputs
        delta = torch.randn(size, 4, 6, 6, generator=gen)
        dl = torch.randn(size, 2, generator=gen)
        for key, made, centre in (
            ("conv", spec.terms(conv, saved, delta)["weight"], conv.weight),
            ("lin", spec_of(lin, xl, dl)["weight"], lin.weight),
        ):
            for chunk in (None, 4):
                fresh = outer_norms.example_sq_norms_and_dots(
                    [made], centre.detach(), size, budget, chunk, dots=False
                )
                kept = outer_norms.example_sq_norms_and_dots(
                    [made], centre.detach(), size, budget, chunk, dots=False,
                    memo=memos[f"{key}{chunk}"],
                )  # fmt: skip
                assert torch.equal(fresh[0], kept[0])
    conv_memo = memos["convNone"]
    assert ("inputs", 0, size) in conv_memo
    assert conv_memo["kept"] <= outer_norms.MIN_BUDGET
    assert any(k[0] == "input_sq" for k in memos["linNone"] if isinstance(k, tuple))


def spec_of(layer: nn.Module, x: torch.Tensor, delta: torch.Tensor):
    from layerwise.sensitivity.layer_terms import spec_for

    spec = spec_for(layer, x, x.shape[0])
    return spec.terms(layer, spec.save(layer, x), delta)


def test_kept_inputs_stop_at_the_budget(monkeypatch):
    from layerwise.sensitivity import outer_norms

    gen = torch.Generator().manual_seed(4)
    size = 8
    conv, spec, saved = _conv_term(size, gen)
    per_example = 3 * 9 * 36  # patches of one example: (C_in k²) × positions
    monkeypatch.setattr(outer_norms, "MIN_BUDGET", 3 * per_example)
    memo: dict = {}
    delta = torch.randn(size, 4, 6, 6, generator=gen)
    made = spec.terms(conv, saved, delta)["weight"]
    outer_norms.example_sq_norms_and_dots([made], conv.weight.detach(), size, 1, 2, False, memo)
    assert memo["kept"] == 3 * per_example - per_example  # whole chunks of 2, within 3
    assert sorted(k for k in memo if isinstance(k, tuple)) == [("inputs", 0, 2)]


def test_substitution_matches_functional_call_and_puts_every_slot_back():
    """The loss writes values into the tree's slots (tied aliases and a submodule shared under
    two names included) as ``torch.func.functional_call`` does, and puts the originals back
    (which ``functional_call`` itself does not do for the shared submodule: it swaps that slot
    twice and restores it once, so the reference runs on a copy)."""
    from torch.func import functional_call

    from layerwise.sensitivity.functional import FunctionalLoss

    torch.manual_seed(0)
    shared = nn.Linear(3, 3)
    net = nn.Sequential(nn.Embedding(5, 3), shared, nn.Tanh(), shared, nn.Linear(3, 5, bias=False))
    net[4].weight = net[0].weight  # tied
    ids = torch.tensor([[1, 2], [3, 4]])

    def loss_fn(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(batch).square().mean()

    def slots() -> list[tuple[str, int]]:
        return [(n, id(t)) for n, t in net.named_parameters(remove_duplicate=False)]

    before = slots()
    names = [n for n, _ in net.named_parameters()]
    values = {n: torch.randn_like(p) for n, p in net.named_parameters()}
    for structure in (None, model_structure(net)):
        loss = FunctionalLoss(net, loss_fn, names, structure=structure)
        expected = functional_call(copy.deepcopy(net), values, (ids,)).square().mean()
        assert torch.equal(loss(values, ids), expected)
        assert slots() == before
        with pytest.raises(RuntimeError, match="boom"):
            FunctionalLoss(net, lambda m, b: (m(b), _raise())[1], names)(values, ids)
        assert slots() == before


def _raise() -> None:
    raise RuntimeError("boom")
