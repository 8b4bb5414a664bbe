"""A collapse while adapting falls back, even when the metric stays "better than before";
the slow decline of overfitting does not."""

from __future__ import annotations

import json
import math

import pytest

from layerwise.policies import Safety
from layerwise.policies.controller import SensitivityController
from layerwise.policies.safety import ValidationWatch
from layerwise.sensitivity import GroupEstimate, SensitivityReport

HEALTHY = SensitivityReport(
    [GroupEstimate(n, 10, param_norm=1.0, grad_norm=1.0, hessian_trace=t) for n, t in
     (("a", 40.0), ("b", 10.0))]
)  # fmt: skip


def _watch(before: float | None, values: list[float], **safety) -> list:
    """Observe ``before`` (not adapting), start adapting, then observe each value with a
    recalibration in between; return what each observation returned."""
    ctrl = SensitivityController(safety=Safety(**safety))
    if before is not None:
        assert ctrl.observe_validation(before) is None
    out = []
    for step, value in enumerate(values, 1):
        ctrl.update(HEALTHY, step=10 * step)
        out.append(ctrl.observe_validation(value, step=10 * step + 5))
    return out


def test_the_reported_collapse_falls_back():
    """Curvature controller, SGD at a high rate: 95.5% accuracy down to 8.3%, all of it
    above the 7% seen before adapting, so the comparison with that value never fired."""
    seen = _watch(0.07, [0.90, 0.955, 0.50, 0.083, 0.083, 0.083], mode="max")
    assert seen[:4] == [None] * 4  # 0.50 lost 48% of 0.955; the first 0.083 is one strike
    d = seen[4]
    assert d is not None and d.fallback and d.step == 55
    assert d.multipliers == {"a": 1.0, "b": 1.0}
    assert d.event == (
        "fallback: validation metric collapsed (0.083 vs 0.955, the best while adapting: a "
        "decline of 0.872 > collapse_drop 0.5 x 0.955; mode max) for 2 consecutive "
        "observation(s)"
    )
    assert seen[5] is None  # in the cooldown now: no second fallback


def test_slow_overfitting_does_not_fall_back():
    assert _watch(0.07, [0.90, 0.91, 0.905, 0.90, 0.899, 0.898], mode="max") == [None] * 6


def test_a_loss_that_climbs_back_falls_back_and_overfitting_of_the_loss_does_not():
    """Mode min: the scale is the improvement since the reference (2.3 - 0.3 = 2), not the
    small peak loss, so a loss that doubles from 0.3 is overfitting, not a collapse."""
    assert _watch(2.3, [0.5, 0.3, 0.35, 0.45, 0.6, 0.62]) == [None] * 6
    seen = _watch(2.3, [0.5, 0.3, 1.4, 1.5])
    assert seen[:3] == [None] * 3
    assert "collapsed (1.5 vs 0.3" in seen[3].event and "mode min" in seen[3].event


def test_one_bad_evaluation_is_not_a_collapse_and_a_recovery_resets_the_count():
    assert _watch(0.1, [0.9, 0.2, 0.9, 0.2, 0.9], mode="max") == [None] * 5


def test_collapse_drop_and_patience_are_settings():
    assert _watch(0.07, [0.955, 0.083, 0.083], mode="max", collapse_drop=math.inf) == [None] * 3
    assert _watch(0.07, [0.955, 0.7], mode="max", collapse_drop=0.25, collapse_patience=1)[1]
    assert _watch(0.07, [0.955, 0.7], mode="max", collapse_patience=1) == [None] * 2
    assert _watch(0.07, [0.955, 0.083, 0.083], mode="max", collapse_patience=3) == [None] * 3


def test_min_delta_bounds_the_collapse_too():
    assert _watch(0.0, [0.02, 0.005, 0.005], mode="max", min_delta=0.1) == [None] * 3
    assert _watch(0.0, [0.02, 0.005, 0.005], mode="max")[2] is not None


def test_a_fallback_starts_a_new_episode_with_a_new_peak():
    ctrl = SensitivityController(safety=Safety(mode="max", cooldown=0, hysteresis=1))
    ctrl.observe_validation(0.1)
    ctrl.update(HEALTHY, step=1)
    ctrl.observe_validation(0.9)
    ctrl.fall_back("elsewhere", step=2)
    assert ctrl.state_dict()["validation"] == {
        "best": 0.1, "strikes": 0, "peak": None, "collapses": 0,
    }  # fmt: skip
    assert ctrl.observe_validation(0.3) is None  # not adapting: the reference is now 0.3
    ctrl.update(HEALTHY, step=3)  # adapting again
    assert ctrl.observe_validation(0.4) is None  # the new peak: 0.4, not 0.9
    assert ctrl.observe_validation(0.35) is None and ctrl.observe_validation(0.35) is None


def test_the_watch_state_round_trips_mid_episode():
    ctrl = SensitivityController(safety=Safety(mode="max"))
    ctrl.observe_validation(0.07)
    ctrl.update(HEALTHY, step=1)
    for v in (0.9, 0.955, 0.083):
        assert ctrl.observe_validation(v) is None
    state = json.loads(json.dumps(ctrl.state_dict()))
    assert state["validation"] == {"best": 0.07, "strikes": 0, "peak": 0.955, "collapses": 1}
    again = SensitivityController(safety=Safety(mode="max"))
    again.load_state_dict(state)
    assert again.observe_validation(0.083).fallback  # the second strike, after the resume


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"best": 1.0, "strikes": 0, "peak": math.inf, "collapses": 0}, "validation peak"),
        ({"best": 1.0, "strikes": 0, "peak": None, "collapses": -1}, "validation collapses"),
        ({"best": 1.0, "strikes": 0}, r"missing \['collapses', 'peak'\]"),
    ],
)
def test_malformed_watch_state_is_named(state, match):
    watch = ValidationWatch("max", 3, 0.0, 0.5, 2)
    with pytest.raises(ValueError, match=match):
        watch.load_state_dict(state)
    assert watch.state_dict() == {"best": None, "strikes": 0, "peak": None, "collapses": 0}
