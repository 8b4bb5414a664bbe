"""Checkpoint at step N, rebuild everything fresh, load, continue: identical to an
uninterrupted run of 2N steps (parameters, multipliers, recalibration log); and a load that
does not fit is refused with a message and changes nothing."""

from __future__ import annotations

import copy
import io
import math

import pandas as pd
import pytest
import torch

from layerwise.engine import LayerwiseOptimizer
from layerwise.policies import LayerwiseLR, SensitivityController, schedules

from .helpers import assert_identical, data, loss_fn, mlp, named_groups, params_of

N, EVERY = 5, 2
PROBE_BATCHES = data(3, size=10, seed=11)  # the estimation batches, drawn one per recalibration


def _build(init_seed: int, kind: str, alpha: float = 1.0):
    net = mlp(init_seed)
    base = torch.optim.Adam(named_groups(net), lr=0.01)
    controller = SensitivityController("curvature", alpha=alpha, max_rel_stderr=math.inf)
    opt = LayerwiseOptimizer(
        base, model=net, loss_fn=loss_fn, controller=controller, recalibrate_every=EVERY,
        batches=PROBE_BATCHES, estimator={"probes": 3}, seed=4,
    )  # fmt: skip
    if kind == "torch":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 2 * N)
    else:  # per-group schedule and factors: LayerwiseLR on the engine
        factors = {"fc0": 0.5, "fc1": 1, "fc2": 2}
        sched = LayerwiseLR(opt, schedules.cosine(2 * N), factors)
    return net, opt, sched


def _train(net, opt, sched, batches):
    for batch in batches:
        opt.zero_grad()
        loss_fn(net, batch).backward()
        opt.step()  # no batch: the engine draws from batches=
        sched.step()


def _roundtrip(checkpoint: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)  # plain data only


@pytest.mark.parametrize("kind", ["torch", "layerwise_lr"])
def test_resume_continues_bit_for_bit(kind):
    train = data(2 * N)
    net, opt, sched = _build(0, kind)
    torch.manual_seed(5)
    _train(net, opt, sched, train)
    expected, expected_history = params_of(net), opt.history

    net, opt, sched = _build(0, kind)
    torch.manual_seed(5)
    _train(net, opt, sched, train[:N])
    checkpoint = _roundtrip(
        {
            "model": net.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng": torch.get_rng_state(),
        }
    )
    del net, opt, sched
    net, opt, sched = _build(123, kind)  # fresh objects, other initial weights
    net.load_state_dict(checkpoint["model"])
    opt.load_state_dict(checkpoint["optimizer"])
    sched.load_state_dict(checkpoint["scheduler"])
    torch.set_rng_state(checkpoint["rng"])
    _train(net, opt, sched, train[N:])

    assert_identical(params_of(net), expected)
    assert opt.steps == 2 * N
    assert any(m != 1.0 for m in opt.multipliers.values())
    columns = [c for c in expected_history.columns if c != "estimate_seconds"]
    pd.testing.assert_frame_equal(opt.history[columns], expected_history[columns])
    assert sorted(set(opt.history["step"])) == [2, 4, 6, 8, 10]


def _trained():
    net, opt, sched = _build(0, "torch")
    torch.manual_seed(5)
    _train(net, opt, sched, data(N))
    return net, opt


def _unchanged_by(opt, bad_state, match):
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad_state)
    after = opt.state_dict()
    assert after["layerwise"]["step"] == before["layerwise"]["step"]
    assert (
        after["layerwise"]["recalibrator"]["controller"]
        == before["layerwise"]["recalibrator"]["controller"]
    )
    assert torch.equal(
        after["layerwise"]["recalibrator"]["generator"],
        before["layerwise"]["recalibrator"]["generator"],
    )
    assert after["param_groups"] == before["param_groups"]
    assert after["layerwise"]["history"] == before["layerwise"]["history"]
    assert after["layerwise"]["batches"] == before["layerwise"]["batches"]


def test_plain_optimizer_state_is_refused():
    _, opt = _trained()
    with pytest.raises(ValueError, match="plain optimizer's state dict"):
        opt.load_state_dict(opt.base.state_dict())


def test_other_group_names_are_refused():
    _, opt = _trained()
    state = copy.deepcopy(opt.state_dict())
    state["param_groups"][1]["name"] = "renamed"
    state["layerwise"]["group_names"][1] = "renamed"
    _unchanged_by(opt, state, "is for groups .*renamed")


def test_bad_generator_state_is_refused():
    _, opt = _trained()
    state = copy.deepcopy(opt.state_dict())
    state["layerwise"]["recalibrator"]["generator"] = torch.zeros(3, dtype=torch.uint8)
    _unchanged_by(opt, state, r"\['generator'\] must be a uint8 tensor")


def test_bad_multiplier_is_refused():
    _, opt = _trained()
    state = copy.deepcopy(opt.state_dict())
    state["param_groups"][0]["lr_multiplier"] = float("nan")
    _unchanged_by(opt, state, "multiplier of group 'fc0' .* finite number > 0, got nan")


def test_controller_with_other_settings_is_refused_and_rolled_back():
    _, opt = _trained()
    state = copy.deepcopy(opt.state_dict())
    _, other, _ = _build(0, "torch", alpha=0.25)
    with pytest.raises(ValueError, match="alpha"):
        other.load_state_dict(state)
    assert other.steps == 0


def test_failing_base_load_rolls_the_controller_back():
    _, opt = _trained()
    state = copy.deepcopy(opt.state_dict())
    _fresh_net, fresh, _ = _build(0, "torch")
    before = copy.deepcopy(fresh.controller.state_dict())
    state["state"] = {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(999)}}
    state["param_groups"][0]["params"] = [0, 1, 2]  # three params where the group has two
    with pytest.raises(ValueError):
        fresh.load_state_dict(state)
    assert fresh.controller.state_dict() == before


def test_missing_engine_keys_are_named():
    _, opt = _trained()
    state = copy.deepcopy(opt.state_dict())
    del state["layerwise"]["history"]
    state["layerwise"]["surprise"] = 1
    _unchanged_by(opt, state, r"missing keys \['history'\], unknown \['surprise'\]")


@pytest.mark.parametrize(
    ("path", "value", "match"),
    [
        (("layerwise", "group_names"), 5, r"\['group_names'\] must be a list"),
        (("param_groups", 0), 5, r"\['param_groups'\]\[0\] must be a mapping"),
        (("layerwise", "step"), "5", r"\['step'\] must be an integer, got '5'"),
        (("layerwise", "version"), 1, "has version 1, this engine reads version 3"),
        (("layerwise", "history"), {"rows": [{"colour": 1}]}, r"unknown columns \['colour'\]"),
        (("layerwise", "batches"), {"drawn": -1}, r"\['drawn'\] must be an integer >= 0, got -1"),
        (("layerwise", "batches"), {"drawn": 1.5}, r"\['drawn'\] must be an integer, got 1.5"),
        (("layerwise", "recalibrator"), None, "has no recalibrator state but this engine has"),
    ],
)
def test_malformed_group_entries_are_named_and_change_nothing(path, value, match):
    _, opt = _trained()
    state = copy.deepcopy(opt.state_dict())
    state[path[0]][path[1]] = value
    _unchanged_by(opt, state, match)


def test_component_entries_are_checked_before_anything_is_loaded():
    """A bad history entry (checked last of the components) leaves a fresh engine's
    controller, generator, base optimizer and step as they were."""
    _, opt = _trained()
    state = copy.deepcopy(opt.state_dict())
    state["layerwise"]["history"] = {"rows": 3}
    _, fresh, _ = _build(0, "torch")
    before = copy.deepcopy(fresh.state_dict())
    with pytest.raises(ValueError, match=r"history state\['rows'\] must be a list"):
        fresh.load_state_dict(state)
    after = fresh.state_dict()
    assert (
        after["layerwise"]["recalibrator"]["controller"]
        == before["layerwise"]["recalibrator"]["controller"]
    )
    assert torch.equal(
        after["layerwise"]["recalibrator"]["generator"],
        before["layerwise"]["recalibrator"]["generator"],
    )
    assert after["state"] == before["state"] == {} and fresh.steps == 0


def test_batch_count_round_trips():
    """The batches= source's draw count is saved and loaded (its replay: the resume test)."""
    _, opt = _trained()
    assert opt.state_dict()["layerwise"]["batches"] == {"drawn": N // EVERY}
    _, fresh, _ = _build(0, "torch")
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert fresh.state_dict()["layerwise"]["batches"] == {"drawn": N // EVERY}
