"""LayerwiseLR in plain torch loops: exact per-group rates, identical resume, clear errors."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from layerwise import policies
from layerwise.policies import LayerwiseLR, layer_decay
from layerwise.policies import schedules as S

WARM_COSINE = S.join([S.linear_warmup(5, 0.1), S.cosine(25, floor=0.05)], [5])


def _setup(optimizer="sgd", seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    groups = policies.group_parameters(model)  # layer.0, layer.1, head
    param_groups = groups.to_optimizer_groups()
    if optimizer == "sgd":
        opt = torch.optim.SGD(param_groups, lr=0.05, momentum=0.9)
    else:
        opt = torch.optim.Adam(param_groups, lr=1e-2)
    return model, groups, opt


def _batches(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 4, generator=gen), torch.randn(16, 2, generator=gen)) for _ in range(n)
    ]


def _train(model, opt, scheduler, batches, lrs=None):
    for x, y in batches:
        if lrs is not None:
            lrs.append([g["lr"] for g in opt.param_groups])
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        scheduler.step()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_rates_are_initial_lr_times_factor_times_schedule_in_a_plain_loop(optimizer):
    model, groups, opt = _setup(optimizer)
    factors = layer_decay(groups, 0.5)
    base = opt.param_groups[0]["lr"]
    scheduler = LayerwiseLR(opt, WARM_COSINE, factors)
    lrs = []
    _train(model, opt, scheduler, _batches(40), lrs)
    for t, row in enumerate(lrs):
        assert row == [base * factors[name] * WARM_COSINE(t) for name in groups.names]
    assert scheduler.last_epoch == 40
    assert scheduler.get_last_lr() == [g["lr"] for g in opt.param_groups]
    assert scheduler.get_last_lr_by_group() == dict(
        zip(groups.names, scheduler.get_last_lr(), strict=True)
    )
    assert all(g["initial_lr"] == base for g in opt.param_groups)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_training_equals_a_loop_that_sets_each_group_rate_by_hand(optimizer):
    model, _, opt = _setup(optimizer)
    ref_model, _, ref_opt = _setup(optimizer)
    factors = {"layer.0": 0.25, "layer.1": 0.5, "head": 3.0}
    scheduler = LayerwiseLR(opt, WARM_COSINE, factors)
    batches = _batches(30)
    _train(model, opt, scheduler, batches)
    base = ref_opt.param_groups[0]["lr"]
    for t, (x, y) in enumerate(batches):
        for group in ref_opt.param_groups:
            group["lr"] = base * factors[group["name"]] * WARM_COSINE(t)
        ref_opt.zero_grad()
        nn.functional.mse_loss(ref_model(x), y).backward()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_schedule_per_group_and_unnamed_groups():
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 1.0}], lr=0.5)
    per_group = {"group0": S.step(2, 0.5), "group1": S.exponential(0.9)}
    scheduler = LayerwiseLR(opt, per_group)
    assert scheduler.group_names == ("group0", "group1")
    for t in range(6):
        assert scheduler.get_last_lr() == [0.5 * 1.0 * 0.5 ** (t // 2), 1.0 * 1.0 * 0.9**t]
        opt.step()
        scheduler.step()


def test_closed_form_path_and_get_lr_agree_and_are_pure():
    _, _, opt = _setup()
    scheduler = LayerwiseLR(opt, S.cosine(20), {"layer.0": 0.1, "layer.1": 0.2, "head": 1.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # get_lr() outside step() is pure: no torch warning
        assert scheduler.get_lr() == scheduler.get_last_lr()
    with warnings.catch_warnings():  # step(epoch) is deprecated; it takes the closed form
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step(13)
    assert scheduler.get_last_lr() == [0.05 * f * S.cosine(20)(13) for f in (0.1, 0.2, 1.0)]
    assert scheduler._get_closed_form_lr() == scheduler.get_lr() == scheduler.get_last_lr()


def test_tensor_learning_rates_are_updated_in_place():
    w = nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([{"params": [w], "name": "w"}], lr=torch.tensor(0.01))
    lr_tensor = opt.param_groups[0]["lr"]
    scheduler = LayerwiseLR(opt, S.exponential(0.5), {"w": 2.0})
    w.grad = torch.ones(3)
    opt.step()
    scheduler.step()
    assert opt.param_groups[0]["lr"] is lr_tensor
    assert float(lr_tensor) == pytest.approx(0.01 * 2.0 * 0.5)


def _checkpoint(model, opt, scheduler):
    state = json.loads(json.dumps(scheduler.state_dict()))  # plain data: survives JSON
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), state


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_from_state_dict_mid_training_continues_identically(optimizer):
    batches = _batches(24)
    straight, groups, opt = _setup(optimizer)
    straight_scheduler = LayerwiseLR(opt, WARM_COSINE, layer_decay(groups, 0.7))
    lrs_straight = []
    _train(straight, opt, straight_scheduler, batches, lrs_straight)

    model, groups, opt = _setup(optimizer)
    scheduler = LayerwiseLR(opt, WARM_COSINE, layer_decay(groups, 0.7))
    _train(model, opt, scheduler, batches[:9])
    saved = _checkpoint(model, opt, scheduler)
    del model, opt, scheduler

    resumed, groups, opt = _setup(optimizer, seed=123)  # other weights until loaded
    scheduler = LayerwiseLR(opt, WARM_COSINE, layer_decay(groups, 0.7))  # before opt.load
    resumed.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    scheduler.load_state_dict(saved[2])
    lrs_resumed = []
    _train(resumed, opt, scheduler, batches[9:], lrs_resumed)

    assert lrs_resumed == lrs_straight[9:]
    for p, q in zip(resumed.parameters(), straight.parameters(), strict=True):
        assert torch.equal(p, q)
    assert scheduler.state_dict() == straight_scheduler.state_dict()


def test_state_dict_is_plain_data_with_specs_not_callables():
    _, groups, opt = _setup()
    scheduler = LayerwiseLR(opt, WARM_COSINE, layer_decay(groups, 0.5))
    state = scheduler.state_dict()
    assert json.loads(json.dumps(state)) == state
    assert state["schedules"]["head"] == WARM_COSINE.spec
    assert state["factors"] == {"layer.0": 0.25, "layer.1": 0.5, "head": 1.0}
    assert state["group_names"] == ["layer.0", "layer.1", "head"]


def test_loading_a_different_schedule_replaces_it_with_a_warning():
    _, _, opt = _setup()
    source = LayerwiseLR(opt, S.cosine(50))
    state = source.state_dict()
    _, _, opt2 = _setup()
    target = LayerwiseLR(opt2, S.cosine(10))
    with pytest.warns(
        UserWarning, match=r"replaces .* for group\(s\) \['layer.0', 'layer.1', 'head'\]"
    ):
        target.load_state_dict(state)
    assert target.schedules["head"] == S.cosine(50)


def _bad(state, **changes):
    state = dict(state)
    for key, value in changes.items():
        if value is None:
            del state[key]
        else:
            state[key] = value
    return state


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"last_epoch": None}, ValueError, r"missing keys \['last_epoch'\], unknown keys \[\]"),
        ({"T_max": 3}, ValueError, r"unknown keys \['T_max'\]"),
        (
            {"group_names": ["a", "b", "c"]},
            ValueError,
            r"for groups \['a', 'b', 'c'\] but the optimizer",
        ),
        (
            {"schedules": {"head": {"name": "constant"}}},
            ValueError,
            r"'schedules' must map each of",
        ),
        (
            {"factors": {"layer.0": 1.0, "layer.1": 1.0, "head": -1.0}},
            ValueError,
            r"group 'head' must lie",
        ),
        ({"last_epoch": -5}, ValueError, r"last_epoch'\] must be an integer >= 0, got -5"),
        ({"base_lrs": [0.1]}, ValueError, r"'base_lrs' must be a list of 3 rates"),
    ],
    ids=["missing", "unknown", "names", "schedules", "factor", "epoch", "base_lrs"],
)
def test_load_state_dict_says_what_did_not_match(change, error, message):
    _, _, opt = _setup()
    scheduler = LayerwiseLR(opt, S.cosine(10))
    with pytest.raises(error, match=message):
        scheduler.load_state_dict(_bad(scheduler.state_dict(), **change))


def test_load_state_dict_names_the_group_with_a_bad_spec():
    _, _, opt = _setup()
    scheduler = LayerwiseLR(opt, S.cosine(10))
    state = scheduler.state_dict()
    state["schedules"]["layer.1"] = {"name": "cosine", "total_steps": 0}
    with pytest.raises(ValueError, match=r"schedule of group 'layer.1': total_steps must be"):
        scheduler.load_state_dict(state)
    with pytest.raises(TypeError, match=r"state_dict must be a mapping, got list"):
        scheduler.load_state_dict([])


@pytest.mark.parametrize(
    ("schedule", "factors", "error", "message"),
    [
        (lambda t: 1.0, None, TypeError, r"schedule must be a policies.schedules.Schedule"),
        (
            {"head": S.constant()},
            None,
            ValueError,
            r"missing \['layer.0', 'layer.1'\], unknown \[\]",
        ),
        (
            {
                "layer.0": S.constant(),
                "layer.1": S.constant(),
                "head": S.constant(),
                "x": S.constant(),
            },
            None,
            ValueError,
            r"unknown \['x'\]",
        ),
        (
            {"layer.0": S.constant(), "layer.1": S.constant(), "head": len},
            None,
            TypeError,
            r"schedule of group 'head' must be",
        ),
        (
            S.constant(),
            {"head": 2.0},
            ValueError,
            r"no factor for group\(s\) \['layer.0', 'layer.1'\]",
        ),
        (
            S.constant(),
            {"layer.0": 1, "layer.1": 1, "head": 0},
            ValueError,
            r"group 'head' must lie",
        ),
    ],
    ids=["lambda", "missing", "unknown", "not-a-schedule", "factor-missing", "factor-zero"],
)
def test_constructor_rejects_bad_arguments(schedule, factors, error, message):
    _, _, opt = _setup()
    with pytest.raises(error, match=message):
        LayerwiseLR(opt, schedule, factors)


def test_constructor_rejects_non_optimizers_duplicate_names_and_bad_last_epoch():
    with pytest.raises(TypeError, match=r"optimizer must be a torch.optim.Optimizer, got"):
        LayerwiseLR([1.0], S.constant())
    a, b = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    twins = torch.optim.SGD([{"params": [a], "name": "x"}, {"params": [b], "name": "x"}], lr=0.1)
    with pytest.raises(ValueError, match=r"group names must be unique, got duplicates \['x'\]"):
        LayerwiseLR(twins, S.constant())
    _, _, opt = _setup()
    with pytest.raises(ValueError, match=r"last_epoch must be an integer >= -1, got -2"):
        LayerwiseLR(opt, S.constant(), last_epoch=-2)


def test_resuming_by_last_epoch_uses_initial_lr_like_torch():
    _, _, opt = _setup()
    LayerwiseLR(opt, S.step(3, 0.5))  # sets initial_lr on each group
    scheduler = LayerwiseLR(opt, S.step(3, 0.5), last_epoch=4)
    assert scheduler.last_epoch == 5
    assert scheduler.get_last_lr() == [0.05 * 0.5] * 3


def test_adding_a_group_after_construction_is_an_error_at_the_next_step():
    _, _, opt = _setup()
    scheduler = LayerwiseLR(opt, S.constant())
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(1))], "name": "late"})
    opt.step()
    with pytest.raises(ValueError, match=r"groups are now \[.*'late'\] but LayerwiseLR was built"):
        scheduler.step()
