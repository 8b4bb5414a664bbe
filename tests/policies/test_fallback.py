"""Each fallback trigger sends the controller to all ones with its reason, and adaptation comes
back only after the cooldown and the hysteresis."""

from __future__ import annotations

import copy
import math

import pytest

from layerwise.policies import Bounds, Safety
from layerwise.policies.controller import SensitivityController
from layerwise.policies.safety import FallbackGate, SpikeMonitor, ValidationWatch, report_problems
from layerwise.sensitivity import GroupEstimate, SensitivityReport


def rep(a: dict | None = None, b: dict | None = None) -> SensitivityReport:
    """Two groups of 10 parameters, curvatures 4 ("a") and 1 ("b"), gradient norms 1."""
    base = dict(param_norm=1.0, grad_norm=1.0)
    return SensitivityReport(
        [
            GroupEstimate("a", 10, **{**base, "hessian_trace": 40.0, **(a or {})}),
            GroupEstimate("b", 10, **{**base, "hessian_trace": 10.0, **(b or {})}),
        ]
    )


HEALTHY = rep()
ONES = {"a": 1.0, "b": 1.0}


def test_non_finite_estimate_falls_back_then_cooldown_then_hysteresis_then_resumes():
    ctrl = SensitivityController(safety=Safety(cooldown=2, hysteresis=2))
    first = ctrl.update(HEALTHY, step=100)
    assert not first.fallback and first.event is None and first.multipliers != ONES

    tripped = ctrl.update(rep(a={"hessian_trace": math.nan}), step=200)
    assert tripped.fallback and tripped.multipliers == ONES
    assert tripped.event == "fallback: non-finite estimate in group a (hessian_trace=nan)"
    assert all(r == tripped.event for r in tripped.reasons.values())
    assert ctrl.multipliers == ONES

    events = []
    for step in (300, 400, 500):
        d = ctrl.update(HEALTHY, step=step)
        assert d.fallback and d.multipliers == ONES
        events.append(d.event)
    assert events[0].startswith("fallback cooldown (1 more recalibration(s)) after: non-finite")
    assert events[1].startswith("fallback cooldown (0 more")
    assert events[2].startswith("fallback recovering (1/2 consecutive healthy reports)")

    resumed = ctrl.update(HEALTHY, step=600)
    assert not resumed.fallback
    assert resumed.event == "adaptation resumed after 2 consecutive healthy report(s)"
    assert resumed.multipliers == pytest.approx({"a": 2**-0.5, "b": 2**0.5})


def test_an_unhealthy_report_while_recovering_starts_over():
    ctrl = SensitivityController(safety=Safety(cooldown=0, hysteresis=2))
    ctrl.update(rep(b={"grad_norm": math.inf}), step=1)
    assert ctrl.update(HEALTHY, step=2).event.startswith("fallback recovering (1/2")
    again = ctrl.update(rep(b={"param_norm": -1.0}), step=3)
    assert again.event == "fallback: impossible negative estimate in group b (param_norm=-1.0)"
    assert ctrl.update(HEALTHY, step=4).event.startswith("fallback recovering (1/2")
    assert not ctrl.update(HEALTHY, step=5).fallback


def test_the_fallback_jumps_to_one_past_the_change_limit_and_resumes_from_one():
    sharp = rep(a={"hessian_trace": 160.0})  # curvature ratio 16: sqrt gives 4 = max_spread
    ctrl = SensitivityController(
        bounds=Bounds(max_change=1.5, max_spread=4.0), safety=Safety(cooldown=0, hysteresis=1)
    )
    assert ctrl.update(sharp, step=1).multipliers == pytest.approx({"a": 1 / 1.5, "b": 1.5})
    assert ctrl.update(sharp, step=2).multipliers == pytest.approx({"a": 0.5, "b": 2.0})
    assert ctrl.update(rep(a={"grad_norm": math.nan}), step=3).multipliers == ONES  # 2 -> 1
    resumed = ctrl.update(sharp, step=4)
    assert resumed.multipliers == pytest.approx({"a": 1 / 1.5, "b": 1.5})


def test_negative_curvature_and_unknown_stderr_are_not_fallbacks():
    ctrl = SensitivityController()
    d = ctrl.update(rep(a={"hessian_trace": -5.0}, b={"hessian_trace_stderr": math.nan}), step=1)
    assert not d.fallback and d.event is None
    assert d.multipliers["b"] == 1.0
    assert d.reasons["b"].startswith("held at 1: relative stderr of curvature inf > 10: not used")


def test_gradient_norm_spike_falls_back_naming_the_group():
    ctrl = SensitivityController(safety=Safety(spike_factor=10.0))
    for step in (1, 2, 3):
        ctrl.update(HEALTHY, step=step)
    assert not ctrl.update(rep(a={"grad_norm": 9.0}), step=4).fallback
    d = ctrl.update(rep(b={"grad_norm": 500.0}), step=5)
    assert d.fallback and d.event.startswith("fallback: gradient-norm spike in group b")
    assert "grad_norm 500 > 10 x running average" in d.event


def test_a_lasting_level_shift_is_absorbed_by_the_spike_average():
    monitor = SpikeMonitor(factor=10.0, decay=0.9)
    for _ in range(5):
        monitor.update(HEALTHY)
    shifted = rep(a={"grad_norm": 50.0})
    spikes = []
    for _ in range(15):
        spikes.append(bool(monitor.check(shifted)))
        monitor.update(shifted)
    assert spikes[0] and not spikes[-1]
    assert spikes == sorted(spikes, reverse=True)  # once absorbed, it stays absorbed


def test_validation_worsening_after_adaptation_falls_back_after_patience():
    ctrl = SensitivityController(safety=Safety(patience=3, mode="min"))
    assert ctrl.observe_validation(1.0) is None
    assert ctrl.observe_validation(0.9) is None  # the best before adaptation: 0.9
    ctrl.update(HEALTHY, step=100)
    assert ctrl.observe_validation(0.95) is None  # worse, 1 strike
    assert ctrl.observe_validation(0.85) is None  # better: strikes reset
    assert ctrl.observe_validation(0.95) is None
    assert ctrl.observe_validation(0.96) is None
    d = ctrl.observe_validation(0.97, step=150)
    assert d is not None and d.fallback and d.step == 150 and d.multipliers == ONES
    assert d.event.startswith("fallback: validation metric worsened (0.97 vs best 0.9")
    assert "3 consecutive" in d.event
    assert ctrl.multipliers == ONES
    assert ctrl.update(HEALTHY, step=200).event.startswith("fallback cooldown")


def test_validation_mode_max_with_min_delta():
    ctrl = SensitivityController(safety=Safety(patience=2, mode="max", min_delta=0.02))
    ctrl.observe_validation(0.80)
    ctrl.update(HEALTHY, step=1)
    assert ctrl.observe_validation(0.79) is None  # within min_delta: not worse
    assert ctrl.observe_validation(0.79) is None
    assert ctrl.observe_validation(0.70) is None
    d = ctrl.observe_validation(0.70)
    assert d is not None and "mode max" in d.event and d.step == 1


def test_non_finite_validation_trips_only_while_adapting():
    ctrl = SensitivityController(safety=Safety(patience=5))
    assert ctrl.observe_validation(math.nan) is None  # before adaptation: ignored
    ctrl.update(HEALTHY, step=1)
    d = ctrl.observe_validation(math.inf)
    assert d.event == "fallback: validation metric not finite (inf) while adapting"


def test_without_a_baseline_the_first_value_while_adapting_is_the_baseline():
    ctrl = SensitivityController(safety=Safety(patience=1))
    ctrl.update(HEALTHY, step=1)
    assert ctrl.observe_validation(2.0) is None
    assert ctrl.observe_validation(1.5) is None
    assert ctrl.observe_validation(2.1).fallback


def test_values_seen_during_a_fallback_become_the_baseline():
    ctrl = SensitivityController(safety=Safety(patience=1, cooldown=0, hysteresis=1))
    ctrl.observe_validation(1.0)
    ctrl.update(rep(a={"hessian_trace": math.inf}), step=1)
    assert ctrl.observe_validation(0.5) is None  # not adapting: a better baseline
    assert not ctrl.update(HEALTHY, step=2).fallback
    assert ctrl.observe_validation(0.6).fallback  # worse than 0.5, though better than 1.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"value": "0.5"}, TypeError, "value"),
        ({"value": True}, TypeError, "value"),
        ({"value": 0.5, "step": -1}, ValueError, "step"),
        ({"value": 0.5, "step": 1.5}, TypeError, "step"),
    ],
    ids=["str", "bool", "negative-step", "float-step"],
)
def test_observe_validation_validates_its_arguments(kwargs, error, match):
    value = kwargs.pop("value")
    with pytest.raises(error, match=match):
        SensitivityController().observe_validation(value, **kwargs)


# -- the pieces on their own ------------------------------------------------------------------
def test_report_problems_lists_every_bad_group():
    bad = rep(a={"noise_to_signal": -math.inf}, b={"hessian_trace_stderr": -0.1})
    assert report_problems(bad) == [
        "non-finite estimate in group a (noise_to_signal=-inf)",
        "impossible negative estimate in group b (hessian_trace_stderr=-0.1)",
    ]
    assert report_problems(rep(a={"grad_variance": -1.0, "hessian_trace": -3.0})) == []


def test_gate_without_cooldown_goes_straight_to_recovering():
    gate = FallbackGate(cooldown=0, hysteresis=1)
    gate.trip("x")
    assert gate.phase == "recovering"
    assert gate.advance() == (True, "adaptation resumed after 1 consecutive healthy report(s)")
    assert gate.advance() == (True, None)


def test_safety_states_reject_malformed_data():
    with pytest.raises(ValueError, match="fallback phase"):
        FallbackGate(1, 1).load_state_dict(
            {"phase": "panic", "remaining": 0, "healthy": 0, "reason": None}
        )
    with pytest.raises(ValueError, match="missing \\['healthy'\\]"):
        FallbackGate(1, 1).load_state_dict({"phase": "adapting", "remaining": 0, "reason": None})
    with pytest.raises(ValueError, match="validation best"):
        ValidationWatch("min", 1, 0.0).load_state_dict(
            {"best": math.nan, "strikes": 0, "peak": None, "collapses": 0}
        )
    with pytest.raises(ValueError, match="spike average"):
        SpikeMonitor(10.0, 0.9).load_state_dict({"averages": {"a": [0.0, 0]}})


@pytest.mark.parametrize(
    ("averages", "match"),
    [
        (5, "spike averages must be a mapping"),
        ([["a", 1.0, 1]], "spike averages must be a mapping"),
        ({"a": ["x", 1]}, "spike average of group 'a'"),
        ({"a": [None, 1]}, "spike average of group 'a'"),
        ({"a": [0.0, 1.5]}, "spike average of group 'a'"),
        ({"a": [math.inf, 1]}, "spike average of group 'a'"),
        ({3: [0.0, 1]}, "spike average group names must be strings"),
    ],
)
def test_malformed_spike_state_is_a_value_error_and_changes_nothing(averages, match):
    ctrl = SensitivityController()
    ctrl.update(HEALTHY, step=1)
    state = ctrl.state_dict()
    before = copy.deepcopy(state)
    state["spike"] = {"averages": averages}
    with pytest.raises(ValueError, match=match):
        ctrl.load_state_dict(state)
    assert ctrl.state_dict() == before
