"""The controller's contract over every registered rule, on adversarial report sequences: one
finite multiplier per group inside the bounds, spread and change limit; determinism; the state
round trip; and argument and state validation."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from layerwise.policies import Bounds, Safety
from layerwise.policies.bounds import violations
from layerwise.policies.controller import Decision, SensitivityController
from layerwise.policies.rules import RULES
from layerwise.sensitivity import GroupEstimate, SensitivityReport

SPECS = [*RULES, "curvature+noise", "curvature+noise+trust_ratio"]
NAMES = ["emb", "l1", "l2", "head", "norm"]
NASTY = [0.0, -0.0, math.nan, math.inf, -math.inf, 5e-324, 1e-300, 1e300, -1.0, -1e300]
FIELDS = ["param_norm", "grad_norm", "grad_norm_stderr", "grad_variance", "grad_variance_stderr",
          "noise_to_signal", "hessian_trace", "hessian_trace_stderr"]  # fmt: skip

#: Mostly plausible values, with zeros, infinities, NaNs, negatives, huge spreads and None.
VALUE = st.one_of(
    st.none(),
    st.floats(1e-4, 1e4),
    st.floats(1e-4, 1e4).map(lambda x: x * 1e-200),
    st.floats(-1e4, 1e4),
    st.sampled_from(NASTY),
)


@st.composite
def reports(draw, nasty: bool = True) -> SensitivityReport:
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=len(NAMES), unique=True))
    value = VALUE if nasty else st.one_of(st.none(), st.floats(1e-4, 1e4))
    groups = [
        GroupEstimate(
            n,
            draw(st.sampled_from([0, 1, 7, 1000, 10**7])),
            hessian_probes=draw(st.sampled_from([None, 1, 8, -1] if nasty else [None, 8])),
            **{f: draw(value) for f in FIELDS},
        )
        for n in names
    ]
    return SensitivityReport(groups)


@st.composite
def controller_kwargs(draw) -> dict:
    return dict(
        alpha=draw(st.sampled_from([0.0, 0.5, 1.0, 3.0])),
        ema=draw(st.sampled_from([0.0, 0.5, 0.9])),
        max_rel_stderr=draw(st.sampled_from([0.1, 0.5, math.inf])),
        bounds=Bounds(
            min_multiplier=draw(st.sampled_from([0.01, 0.1, 0.5, 1.0])),
            max_multiplier=draw(st.sampled_from([1.0, 2.0, 10.0, 100.0])),
            max_spread=draw(st.sampled_from([1.0, 2.0, 4.0, 1e3])),
            max_change=draw(st.sampled_from([1.0, 1.5, 10.0])),
        ),
        safety=Safety(
            cooldown=draw(st.integers(0, 2)),
            hysteresis=draw(st.integers(1, 2)),
            patience=draw(st.integers(1, 2)),
        ),
    )


VALIDATION = st.one_of(st.none(), st.floats(0.0, 2.0), st.just(math.nan))
SEQUENCE = st.lists(st.tuples(reports(), VALIDATION), min_size=1, max_size=4)
# Generating adversarial reports dominates the run time; every rule gets its own examples.
FEW = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run(ctrl: SensitivityController, sequence, start: int = 0) -> list[Decision]:
    out = []
    for i, (report, val) in enumerate(sequence, start):
        out.append(ctrl.update(report, step=10 * i))
        if val is not None:
            d = ctrl.observe_validation(val, step=10 * i + 5)
            if d is not None:
                out.append(d)
    return out


# -- the contract -----------------------------------------------------------------------------
@pytest.mark.parametrize("spec", SPECS)
@FEW
@given(kwargs=controller_kwargs(), sequence=SEQUENCE)
def test_every_decision_is_bounded_and_covers_every_group(spec, kwargs, sequence):
    ctrl = SensitivityController(spec, **kwargs)
    previous: dict[str, float] = {}
    for i, (report, val) in enumerate(sequence):
        d = ctrl.update(report, step=i)
        assert list(d.multipliers) == report.names == list(d.reasons)
        assert all(isinstance(r, str) and r for r in d.reasons.values())
        assert violations(d.multipliers, previous, ctrl.bounds, check_change=not d.fallback) == []
        if d.fallback:
            assert set(d.multipliers.values()) == {1.0}
            assert d.event and d.event.startswith(("fallback", "adaptation resumed"))
            previous = dict.fromkeys(previous, 1.0)
        previous.update(d.multipliers)
        assert ctrl.multipliers == previous
        if val is not None and (v := ctrl.observe_validation(val)) is not None:
            assert v.fallback and set(v.multipliers) == set(previous)
            assert set(v.multipliers.values()) == {1.0}
            previous = dict(v.multipliers)


@pytest.mark.parametrize("spec", SPECS)
@FEW
@given(kwargs=controller_kwargs(), sequence=SEQUENCE, split=st.integers(0, 4))
def test_decisions_are_deterministic_and_survive_a_json_state_round_trip(
    spec, kwargs, sequence, split
):
    k = min(split, len(sequence))
    reference = run(SensitivityController(spec, **kwargs), sequence)
    ctrl = SensitivityController(spec, **kwargs)
    head = run(ctrl, sequence[:k])
    state = ctrl.state_dict()
    assert _plain(state)
    text = json.dumps(state)
    assert "NaN" not in text
    twin = SensitivityController(spec, **kwargs)
    twin.load_state_dict(json.loads(text))
    assert twin.state_dict() == state
    assert head + run(twin, sequence[k:], start=k) == reference


def _plain(x) -> bool:
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_plain(v) for v in x)
    return x is None or isinstance(x, bool | int | float | str)


@FEW
@given(sequence=st.lists(reports(nasty=False), min_size=1, max_size=4))
def test_uniform_rule_is_all_ones(sequence):
    ctrl = SensitivityController("uniform", safety=Safety(spike_factor=math.inf))
    for i, report in enumerate(sequence):
        assert set(ctrl.update(report, step=i).multipliers.values()) == {1.0}


# -- behaviour on plain cases -----------------------------------------------------------------
def _report(**traces: float) -> SensitivityReport:
    return SensitivityReport([GroupEstimate(n, 10, hessian_trace=t) for n, t in traces.items()])


def test_a_new_group_starts_at_one_and_a_missing_group_keeps_its_multiplier():
    ctrl = SensitivityController(bounds=Bounds(max_change=1.5, max_spread=16.0))
    ctrl.update(_report(a=1000.0, b=1.0), step=1)
    d = ctrl.update(_report(a=1000.0, b=1.0, c=1.0), step=2)
    assert d.multipliers["c"] <= 1.5  # moved from 1 at most by max_change
    d3 = ctrl.update(_report(b=1.0, c=1.0), step=3)
    assert set(d3.multipliers) == {"b", "c"}
    assert ctrl.multipliers["a"] == d.multipliers["a"]


def test_a_group_with_a_noisy_estimate_keeps_its_previous_multiplier_until_smoothing_helps():
    def noisy(step_rel: float) -> SensitivityReport:
        return SensitivityReport(
            [
                GroupEstimate("a", 10, hessian_trace=40.0, hessian_trace_stderr=40.0 * step_rel),
                GroupEstimate("b", 10, hessian_trace=10.0),
            ]
        )

    ctrl = SensitivityController(ema=0.5, max_rel_stderr=0.5)
    d = ctrl.update(noisy(0.7), step=1)
    assert d.multipliers["a"] == 1.0
    assert d.reasons["a"].startswith("held at 1: relative stderr of curvature 0.7 > max_rel_stderr")
    for step in range(2, 6):
        d = ctrl.update(noisy(0.7), step=step)  # the EMA's stderr falls towards 0.7 / sqrt(3)
    assert d.reasons["a"].startswith("curvature: curvature 4")
    assert d.multipliers["a"] < 1.0


def test_reasons_explain_the_rule_the_proposal_and_the_bounds():
    # curvatures 4 and 0.1: proposal sqrt(sqrt(4 * 0.1) / 4) = 0.3976 for "a"
    d = SensitivityController(bounds=Bounds(max_change=1.5)).update(_report(a=40.0, b=1.0), step=1)
    assert d.reasons["a"] == (
        "curvature: curvature 4 -> proposed 0.3976; max_spread: 0.3976 -> 0.5; "
        "max_change: 0.5 -> 0.6667 -> 0.6667"
    )


def test_decision_to_dict_is_plain_data():
    d = SensitivityController().update(_report(a=1.0), step=3)
    assert d.to_dict() == {
        "step": 3,
        "multipliers": {"a": 1.0},
        "reasons": d.reasons,
        "fallback": False,
        "event": None,
    }


# -- argument and state validation ------------------------------------------------------------
BAD_ARGS = [
    ({"rule": "curvy"}, ValueError, "unknown rule 'curvy'; known rules are"),
    ({"alpha": -0.1}, ValueError, r"alpha must be in \[0, inf\), got -0.1"),
    ({"alpha": math.inf}, ValueError, r"alpha must be in \[0, inf\), got inf"),
    ({"alpha": "1"}, TypeError, "alpha must be a real number, got '1'"),
    ({"min_multiplier": 2.0}, ValueError, r"min_multiplier must be in \(0, 1\], got 2.0"),
    ({"max_multiplier": 0.5}, ValueError, "max_multiplier must be finite and >= 1.0, got 0.5"),
    ({"max_spread": 0.5}, ValueError, "max_spread must be finite and >= 1.0, got 0.5"),
    ({"max_change": math.nan}, ValueError, "max_change must be finite and >= 1.0, got nan"),
    ({"ema": 1.0}, ValueError, r"ema must be in \[0, 1\), got 1.0"),
    ({"max_rel_stderr": 0.0}, ValueError, r"max_rel_stderr must be in \(0, inf\], got 0.0"),
    ({"spike_factor": 1.0}, ValueError, r"spike_factor must be in \(1, inf\], got 1.0"),
    ({"spike_ema": -0.1}, ValueError, r"spike_ema must be in \[0, 1\), got -0.1"),
    ({"cooldown": -1}, ValueError, "cooldown must be >= 0, got -1"),
    ({"cooldown": 1.0}, TypeError, "cooldown must be an int, got 1.0"),
    ({"hysteresis": 0}, ValueError, "hysteresis must be >= 1, got 0"),
    ({"patience": True}, TypeError, "patience must be an int, got True"),
    ({"mode": "up"}, ValueError, "mode must be 'min' or 'max', got 'up'"),
    ({"min_delta": -1.0}, ValueError, r"min_delta must be in \[0, inf\), got -1.0"),
    ({"collapse_drop": 0.0}, ValueError, r"collapse_drop must be in \(0, inf\], got 0.0"),
    ({"collapse_drop": math.nan}, ValueError, r"collapse_drop must be in \(0, inf\], got nan"),
    ({"collapse_drop": "0.5"}, TypeError, "collapse_drop must be a real number, got '0.5'"),
    ({"collapse_patience": 0}, ValueError, "collapse_patience must be >= 1, got 0"),
    ({"collapse_patience": 2.0}, TypeError, "collapse_patience must be an int, got 2.0"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ARGS, ids=[str(a) for a, *_ in BAD_ARGS])
def test_flat_settings_reject_bad_values_naming_them(kwargs, error, match):
    with pytest.raises(error, match=match):
        SensitivityController.from_dict(kwargs)


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_ARGS, ids=[str(a) for a, *_ in BAD_ARGS])
def test_constructor_and_settings_objects_reject_bad_values_naming_them(kwargs, error, match):
    (key,) = kwargs
    owner = {f: cls for cls in (Bounds, Safety) for f in cls.__dataclass_fields__}.get(key)
    with pytest.raises(error, match=match):
        if owner is None:
            SensitivityController(**kwargs)
        else:
            owner(**kwargs)


def test_update_validates_its_arguments():
    ctrl = SensitivityController()
    with pytest.raises(TypeError, match="report must be a SensitivityReport"):
        ctrl.update({"a": 1.0}, step=0)
    with pytest.raises(ValueError, match="at least one group"):
        ctrl.update(SensitivityReport([]), step=0)
    with pytest.raises(TypeError, match="step"):
        ctrl.update(_report(a=1.0), step=True)
    ctrl.update(_report(a=1.0), step=10)
    with pytest.raises(ValueError, match="step must be >= 10, got 9"):
        ctrl.update(_report(a=1.0), step=9)


def _state() -> dict:
    ctrl = SensitivityController()
    ctrl.update(_report(a=4.0, b=1.0), step=1)
    return json.loads(json.dumps(ctrl.state_dict()))


def _with(path: list, value) -> dict:
    state = _state()
    node = state
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return state


BAD_STATES = [
    (["settings", "alpha"], 1.0, "other settings \\(alpha: saved 1.0, here 0.5\\)"),
    (["settings", "rule"], "noise", "rule: saved 'noise', here 'curvature'"),
    (["version"], 1, "state version must be 2, got 1"),
    (["multipliers", "a"], 3.0, "multiplier of group 'a' must be a float in \\[0.5, 2\\]"),
    (["multipliers", "a"], "x", "multiplier of group 'a'"),
    (["step"], -1, "state step"),
    (["smoothing", "a", "curvature"], [0.0, 0.0], "smoothing state of 'a'/'curvature'"),
    (["gate", "phase"], "panic", "fallback phase"),
    (["validation", "strikes"], -1, "validation strikes"),
]


@pytest.mark.parametrize(
    ("path", "value", "match"), BAD_STATES, ids=[str(p) for p, *_ in BAD_STATES]
)
def test_load_state_dict_names_what_did_not_match(path, value, match):
    ctrl = SensitivityController()
    before = ctrl.state_dict()
    with pytest.raises(ValueError, match=match):
        ctrl.load_state_dict(_with(path, value))
    assert ctrl.state_dict() == before  # nothing half-loaded


def test_load_state_dict_names_missing_and_unexpected_keys():
    state = _state()
    del state["gate"]
    state["extra"] = 1
    with pytest.raises(ValueError, match="missing \\['gate'\\], unexpected \\['extra'\\]"):
        SensitivityController().load_state_dict(state)
    with pytest.raises(ValueError, match="state must be a mapping"):
        SensitivityController().load_state_dict([1, 2])
