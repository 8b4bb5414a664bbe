"""The controller never raises on finite input, and an update that fails leaves its state as
it was: extreme finite reports for every rule, the overflow that once broke the reason text,
and a failure injected midway through an update."""

from __future__ import annotations

import copy
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerwise.policies import Bounds, Safety
from layerwise.policies.bounds import violations
from layerwise.policies.controller import SensitivityController
from layerwise.policies.rules import RULES, TrustRatioRule
from layerwise.sensitivity import GroupEstimate, SensitivityReport

SPECS = [*RULES, "curvature+noise", "curvature+noise+trust_ratio"]
FIELDS = ["param_norm", "grad_norm", "grad_norm_stderr", "grad_variance", "grad_variance_stderr",
          "noise_to_signal", "hessian_trace", "hessian_trace_stderr"]  # fmt: skip
EXTREMES = [0.0, -0.0, 5e-324, 1e-320, 1e-300, 1e-30, 1.0, 1e30, 1e300, 1.7976931348623157e308]

#: Finite magnitudes from the smallest subnormals to the largest doubles, zeros, either sign.
MAGNITUDE = st.one_of(
    st.sampled_from(EXTREMES),
    st.builds(lambda m, e: m * 10.0**e, st.floats(1.0, 9.99), st.integers(-320, 300)),
)
FINITE = st.one_of(MAGNITUDE, MAGNITUDE.map(lambda x: -x))


@st.composite
def extreme_reports(draw, signed: bool) -> SensitivityReport:
    names = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True))
    value = FINITE if signed else MAGNITUDE
    return SensitivityReport(
        [
            GroupEstimate(
                n,
                draw(st.sampled_from([0, 1, 10, 10**7, 10**12])),
                hessian_probes=draw(st.sampled_from([None, 1, 8])),
                **{f: draw(value) for f in FIELDS},
            )
            for n in names
        ]
    )


SEQUENCE = st.lists(
    st.tuples(extreme_reports(signed=True) | extreme_reports(signed=False), st.none() | FINITE),
    min_size=1,
    max_size=5,
)
KWARGS = st.fixed_dictionaries(
    {
        "alpha": st.sampled_from([0.0, 0.5, 1.0, 50.0]),
        "ema": st.sampled_from([0.0, 0.5, 0.99]),
        "max_rel_stderr": st.sampled_from([0.5, math.inf]),
        "bounds": st.sampled_from([Bounds(), Bounds(0.001, 1000.0, 1e6, 1e3)]),
        "safety": st.sampled_from([Safety(), Safety(cooldown=0, hysteresis=1, mode="max")]),
    }
)


@pytest.mark.parametrize("spec", SPECS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kwargs=KWARGS, sequence=SEQUENCE)
def test_update_never_raises_on_extreme_finite_input(spec, kwargs, sequence):
    """Every decision holds finite multipliers inside the bounds, and none came from the
    arithmetic-error safety net: the ordinary path handles every finite input."""
    ctrl = SensitivityController(spec, **kwargs)
    previous: dict[str, float] = {}
    for step, (report, value) in enumerate(sequence):
        d = ctrl.update(report, step=step)
        assert list(d.multipliers) == report.names
        assert all(math.isfinite(m) for m in d.multipliers.values())
        assert violations(d.multipliers, previous, ctrl.bounds, check_change=not d.fallback) == []
        assert not any("arithmetic error" in r for r in d.reasons.values()), d.reasons
        previous = (
            {**dict.fromkeys(previous, 1.0), **d.multipliers}
            if d.fallback
            else {**previous, **d.multipliers}
        )
        if value is not None and (v := ctrl.observe_validation(value, step=step)) is not None:
            assert set(v.multipliers.values()) == {1.0}
            previous = dict(v.multipliers)


def test_trust_ratio_beyond_the_float_range_is_written_not_raised():
    """log(1e300 / 5e-324) = 1435 > 709: ``math.exp`` of it raised OverflowError."""
    report = SensitivityReport(
        [
            GroupEstimate("a", 10, param_norm=1e300, grad_norm=5e-324),
            GroupEstimate("b", 10, param_norm=1.0, grad_norm=1.0),
        ]
    )
    d = SensitivityController("trust_ratio").update(report, step=1)
    assert not d.fallback
    assert d.reasons["a"].startswith("trust_ratio: trust_ratio 2.024e+623 -> proposed")
    assert d.multipliers == {"a": 1.5, "b": 1 / 1.5}  # the change limit, from 1


class _Failing:
    """The trust-ratio rule, made to fail while scoring once ``armed``: after the spike
    check, the gate and the smoothing have run, i.e. midway through an update."""

    name = "failing"
    quantities = ("grad_norm",)

    def __init__(self, error: Exception, armed: bool = True) -> None:
        self.error, self.armed, self.inner = error, armed, TrustRatioRule()

    def measure(self, report):
        return self.inner.measure(report)

    def score(self, logs):
        if self.armed:
            raise self.error
        return self.inner.score(logs)


def _report(a: float, b: float) -> SensitivityReport:
    return SensitivityReport(
        [GroupEstimate(n, 10, param_norm=p, grad_norm=1.0) for n, p in (("a", a), ("b", b))]
    )


def test_a_failure_midway_leaves_the_state_exactly_as_it_was():
    rule = _Failing(RuntimeError("boom"), armed=False)
    ctrl = SensitivityController(rule, max_rel_stderr=math.inf)
    ctrl.observe_validation(0.5)
    ctrl.update(_report(4.0, 1.0), step=1)
    rule.armed = True
    before = copy.deepcopy(ctrl.state_dict())
    with pytest.raises(RuntimeError, match="boom"):
        ctrl.update(_report(8.0, 1.0), step=2)
    assert ctrl.state_dict() == before
    rule.armed = False
    assert ctrl.update(_report(8.0, 1.0), step=2).step == 2  # the same step is still allowed


def test_an_unforeseen_arithmetic_error_becomes_a_fallback_from_the_old_state():
    ctrl = SensitivityController(_Failing(OverflowError("math range error")))
    before = ctrl.state_dict()
    d = ctrl.update(_report(4.0, 1.0), step=3)
    assert d.fallback and d.multipliers == {"a": 1.0, "b": 1.0}
    assert d.event == ("fallback: arithmetic error in the update (OverflowError: math range error)")
    after = ctrl.state_dict()
    assert after["step"] == 3 and after["updates"] == 1
    assert after["smoothing"] == before["smoothing"] == {}  # not fed from the failed update
    assert after["spike"] == before["spike"]
    assert after["gate"]["phase"] == "cooldown"


def test_fall_back_is_a_fallback_with_the_given_reason():
    ctrl = SensitivityController(safety=Safety(cooldown=1, hysteresis=1))
    ctrl.update(_report(4.0, 1.0), step=1)
    d = ctrl.fall_back("non-finite gradients at step 7", step=7)
    assert d.fallback and d.step == 7 and d.multipliers == {"a": 1.0, "b": 1.0}
    assert d.event == "fallback: non-finite gradients at step 7"
    assert ctrl.multipliers == {"a": 1.0, "b": 1.0} and not ctrl.adapting
    with pytest.raises(TypeError, match="reason must be a non-empty string, got ''"):
        ctrl.fall_back("", step=8)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        ctrl.fall_back("x", step=-1)
