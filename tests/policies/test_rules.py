"""Each rule's formula on hand-computed cases, the floor rule, composition, normalisation to a
parameter-weighted geometric mean of 1, and monotonicity of ``curvature``."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerwise.policies import Bounds
from layerwise.policies.controller import SensitivityController
from layerwise.policies.rules import (
    RULES,
    CompositeRule,
    CurvatureRule,
    Measurement,
    NoiseRule,
    Rule,
    TrustRatioRule,
    UniformRule,
    make_rule,
    normalise,
)
from layerwise.sensitivity import GroupEstimate, SensitivityReport

SPECS = [*RULES, "curvature+noise", "curvature+noise+trust_ratio"]


def report(*rows: tuple[str, int, dict]) -> SensitivityReport:
    return SensitivityReport([GroupEstimate(name, n, **kw) for name, n, kw in rows])


def rule_multipliers(rule: Rule, rep: SensitivityReport, alpha: float = 1.0) -> dict[str, float]:
    """The rule's multipliers before bounds, without smoothing (what the controller normalises)."""
    scores = {}
    for group, inputs in rule.measure(rep).items():
        if not isinstance(inputs, str):
            scores[group] = rule.score({k: m.log_value for k, m in inputs.items()})
    return normalise(scores, {g.group: g.num_params for g in rep if g.group in scores}, alpha)


def weighted_log_mean(m: dict[str, float], rep: SensitivityReport) -> float:
    w = {g.group: g.num_params for g in rep if g.group in m}
    total = sum(w.values()) or len(w)
    return math.fsum((w[n] if sum(w.values()) else 1) * math.log(v) for n, v in m.items()) / total


# -- hand-computed cases ----------------------------------------------------------------------
def test_curvature_is_reference_over_curvature_to_the_alpha():
    rep = report(("a", 10, {"hessian_trace": 40.0}), ("b", 30, {"hessian_trace": 3.0}))
    # curvatures 4 and 0.1 (above the floor 0.01 * (10 * 4 + 30 * 0.1) / 40); their
    # parameter-weighted geometric mean:
    ref = 4.0**0.25 * 0.1**0.75
    m = rule_multipliers(CurvatureRule(), rep, alpha=0.5)
    assert m["a"] == pytest.approx((ref / 4.0) ** 0.5, rel=1e-12)
    assert m["b"] == pytest.approx((ref / 0.1) ** 0.5, rel=1e-12)


def test_curvature_floor_replaces_zero_and_negative_curvature():
    # positive parts weighted by size: (10*4 + 10*0 + 20*0) / 40 = 1, floor = 0.01 * 1
    rep = report(
        ("a", 10, {"hessian_trace": 40.0}),
        ("b", 10, {"hessian_trace": -20.0}),
        ("c", 20, {"hessian_trace": 0.0}),
    )
    measured = CurvatureRule().measure(rep)
    assert [math.exp(measured[g]["curvature"].log_value) for g in "abc"] == pytest.approx(
        [4.0, 0.01, 0.01], rel=1e-12
    )
    ref = 4.0**0.25 * 0.01**0.75
    m = rule_multipliers(CurvatureRule(), rep)
    assert m == pytest.approx({"a": ref / 4.0, "b": ref / 0.01, "c": ref / 0.01}, rel=1e-12)
    assert rule_multipliers(CurvatureRule(floor=0.5), rep)["b"] == pytest.approx(
        (4.0**0.25 * 0.5**0.75) / 0.5, rel=1e-12
    )


def test_curvature_all_non_positive_is_uniform():
    rep = report(("a", 3, {"hessian_trace": -1.0}), ("b", 5, {"hessian_trace": 0.0}))
    assert rule_multipliers(CurvatureRule(), rep) == {"a": 1.0, "b": 1.0}


def test_curvature_missing_trace_or_no_parameters_is_a_reason():
    rep = report(("a", 3, {"hessian_trace": 1.0}), ("b", 5, {}), ("c", 0, {"hessian_trace": 1.0}))
    measured = CurvatureRule().measure(rep)
    assert isinstance(measured["b"], str) and "hessian_trace" in measured["b"]
    assert isinstance(measured["c"], str)


def test_curvature_relative_stderr_is_stderr_over_abs_trace():
    rep = report(
        ("a", 4, {"hessian_trace": -8.0, "hessian_trace_stderr": 2.0}),
        ("b", 4, {"hessian_trace": 8.0}),
        ("c", 4, {"hessian_trace": 0.0, "hessian_trace_stderr": 1.0}),
    )
    measured = CurvatureRule().measure(rep)
    assert measured["a"]["curvature"].rel_stderr == 0.25
    assert measured["b"]["curvature"].rel_stderr == 0.0  # no stderr: taken as exact
    assert measured["c"]["curvature"].rel_stderr == math.inf


def test_noise_is_one_over_one_plus_noise_to_signal_normalised():
    rep = report(
        ("a", 1, {"noise_to_signal": 3.0}),
        ("b", 1, {"noise_to_signal": 0.0}),
        ("c", 2, {"noise_to_signal": -0.5}),  # clipped at 0
    )
    ref = 4.0**0.25  # weighted geometric mean of 1 + nsr = (4, 1, 1) with weights (1, 1, 2)
    m = rule_multipliers(NoiseRule(), rep)
    assert m == pytest.approx({"a": ref / 4.0, "b": ref, "c": ref}, rel=1e-12)


def test_noise_relative_stderr_by_the_delta_method():
    rep = report(
        (
            "a",
            1,
            dict(
                noise_to_signal=1.0,
                grad_variance=2.0,
                grad_variance_stderr=0.2,
                grad_norm=1.0,
                grad_norm_stderr=0.05,
            ),
        )
    )
    # rel(nsr) = hypot(0.1, 2 * 0.05); rel(1 + nsr) = nsr / (1 + nsr) * rel(nsr)
    got = NoiseRule().measure(rep)["a"]["noise_factor"].rel_stderr
    assert got == pytest.approx(0.5 * math.hypot(0.1, 0.1), rel=1e-12)


def test_trust_ratio_at_alpha_one_is_the_normalised_lars_ratio():
    rep = report(
        ("a", 1, {"param_norm": 3.0, "grad_norm": 1.0, "grad_norm_stderr": 0.1}),
        ("b", 1, {"param_norm": 1.0, "grad_norm": 3.0}),
    )
    assert rule_multipliers(TrustRatioRule(), rep) == pytest.approx({"a": 3.0, "b": 1 / 3.0})
    assert TrustRatioRule().measure(rep)["a"]["trust_ratio"].rel_stderr == pytest.approx(0.1)
    zero = report(("a", 1, {"param_norm": 0.0, "grad_norm": 1.0}))
    assert "undefined" in TrustRatioRule().measure(zero)["a"]


def test_uniform_is_all_ones():
    rep = report(("a", 1, {"hessian_trace": 5.0}), ("b", 9, {}))
    assert rule_multipliers(UniformRule(), rep) == {"a": 1.0, "b": 1.0}


def test_composition_is_the_product_of_the_parts():
    rep = report(
        ("a", 10, {"hessian_trace": 40.0, "noise_to_signal": 0.5}),
        ("b", 30, {"hessian_trace": 3.0, "noise_to_signal": 4.0}),
        ("c", 5, {"hessian_trace": 2.0, "noise_to_signal": 0.0}),
    )
    both = rule_multipliers(make_rule("curvature+noise"), rep, alpha=0.5)
    c = rule_multipliers(CurvatureRule(), rep, alpha=0.5)
    n = rule_multipliers(NoiseRule(), rep, alpha=0.5)
    assert both == pytest.approx({g: c[g] * n[g] for g in "abc"}, rel=1e-12)


def test_composition_needs_every_part():
    rep = report(("a", 10, {"hessian_trace": 40.0}))
    measured = make_rule(["curvature", "noise"]).measure(rep)
    assert measured["a"].startswith("noise: ")


def test_power_scales_a_rules_score():
    rep = report(("a", 1, {"hessian_trace": 4.0}), ("b", 1, {"hessian_trace": 1.0}))
    assert rule_multipliers(CurvatureRule(power=2.0), rep) == pytest.approx(
        rule_multipliers(CurvatureRule(), rep, alpha=2.0)
    )


# -- construction and errors ------------------------------------------------------------------
def test_make_rule_accepts_names_compositions_lists_and_objects():
    assert make_rule("noise") == NoiseRule()
    assert make_rule(" curvature + noise ").name == "curvature+noise"
    assert make_rule(["trust_ratio", CurvatureRule(power=2.0)]).name == "trust_ratio+curvature"
    custom = CurvatureRule(floor=0.5)
    assert make_rule(custom) is custom


def test_make_rule_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown rule 'curvy'.*'curvature'.*'uniform'"):
        make_rule("curvy")


@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        (42, TypeError, "rule must be"),
        ([1.5], TypeError, "rule must be"),
        ([], ValueError, "at least one"),
        ("noise+noise", ValueError, "without repeats"),
    ],
    ids=["number", "list-of-number", "empty", "repeat"],
)
def test_make_rule_rejects_bad_specs(spec, error, match):
    with pytest.raises(error, match=match):
        make_rule(spec)


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: CurvatureRule(power=-1.0), "power"),
        (lambda: NoiseRule(power=math.inf), "power"),
        (lambda: TrustRatioRule(power="1"), "power"),
        (lambda: CurvatureRule(floor=0.0), "floor"),
        (lambda: CurvatureRule(floor=2.0), "floor"),
    ],
    ids=["negative-power", "inf-power", "str-power", "zero-floor", "big-floor"],
)
def test_rule_parameters_are_validated(factory, match):
    with pytest.raises((ValueError, TypeError), match=match):
        factory()


def test_composite_rejects_parts_sharing_an_input():
    twin = CurvatureRule(name="curvature2")
    with pytest.raises(ValueError, match="share input names"):
        CompositeRule((CurvatureRule(), twin)).measure(report(("a", 1, {"hessian_trace": 1.0})))


def test_normalise_validates_and_clips():
    with pytest.raises(ValueError, match="alpha"):
        normalise({"a": 0.0}, {"a": 1}, alpha=-1.0)
    with pytest.raises(ValueError, match="weights"):
        normalise({"a": 0.0}, {"a": math.nan})
    with pytest.raises(ValueError, match="scores"):
        normalise({"a": math.inf}, {"a": 1})
    assert normalise({"a": 0.0, "b": 0.0}, {"a": 0, "b": 0}) == {"a": 1.0, "b": 1.0}
    huge = normalise({"a": -1e6, "b": 1e6}, {"a": 1, "b": 1})
    assert math.isfinite(huge["b"]) and huge["a"] > 0
    assert normalise({}, {}) == {}


def test_every_registered_rule_satisfies_the_protocol():
    for name, factory in RULES.items():
        rule = factory()
        assert isinstance(rule, Rule) and rule.name == name


# -- properties -------------------------------------------------------------------------------
POSITIVE = st.floats(1e-6, 1e6)


@st.composite
def healthy_reports(draw) -> SensitivityReport:
    names = draw(st.lists(st.sampled_from("abcdef"), min_size=1, max_size=6, unique=True))
    rows = []
    for n in names:
        kw = dict(
            param_norm=draw(POSITIVE),
            grad_norm=draw(POSITIVE),
            noise_to_signal=draw(st.floats(-1.0, 1e4)),
            hessian_trace=draw(st.floats(-1e4, 1e4)),
        )
        rows.append((n, draw(st.integers(0, 10**6)), kw))
    return report(*rows)


@settings(max_examples=60, deadline=None)
@given(rep=healthy_reports(), alpha=st.floats(0.0, 3.0), spec=st.sampled_from(SPECS))
def test_weighted_geometric_mean_is_one_before_bounds(rep, alpha, spec):
    m = rule_multipliers(make_rule(spec), rep, alpha)
    if m:
        assert abs(weighted_log_mean(m, rep)) <= 1e-9 * max(1.0, alpha)


@st.composite
def curvature_case(draw):
    k = draw(st.integers(1, 5))
    sizes = draw(st.lists(st.integers(1, 10**5), min_size=k, max_size=k))
    traces = draw(st.lists(st.floats(-1e3, 1e3), min_size=k, max_size=k))
    i = draw(st.integers(0, k - 1))
    more = draw(st.floats(0.0, 1e3))
    return sizes, traces, i, more


def _curvature_report(sizes, traces):
    return report(
        *(
            (f"g{j}", n, {"hessian_trace": t})
            for j, (n, t) in enumerate(zip(sizes, traces, strict=True))
        )
    )


@settings(max_examples=60, deadline=None)
@given(case=curvature_case(), alpha=st.floats(0.0, 3.0))
def test_more_curvature_never_gives_a_larger_multiplier(case, alpha):
    sizes, traces, i, more = case
    raised = list(traces)
    raised[i] = traces[i] + more
    before = rule_multipliers(CurvatureRule(), _curvature_report(sizes, traces), alpha)
    after = rule_multipliers(CurvatureRule(), _curvature_report(sizes, raised), alpha)
    assert after[f"g{i}"] <= before[f"g{i}"] * (1 + 1e-12)
    # ... and through the whole controller, bounds included (first recalibration)
    ctrl = dict(alpha=alpha, bounds=Bounds(max_spread=8.0, max_change=3.0))
    b = SensitivityController(**ctrl).update(_curvature_report(sizes, traces), step=1)
    a = SensitivityController(**ctrl).update(_curvature_report(sizes, raised), step=1)
    assert a.multipliers[f"g{i}"] <= b.multipliers[f"g{i}"] * (1 + 1e-12)


def test_measurement_is_a_log_value_with_its_relative_stderr():
    m = Measurement(math.log(2.0), 0.1)
    assert m.log_value == math.log(2.0) and m.rel_stderr == 0.1


def test_noise_rule_infinite_noise_to_signal_gets_the_smallest_step_without_fallback():
    """+inf noise_to_signal (no detectable signal) is a state, not a failure: that group gets
    the smallest multiplier and the controller does not fall back."""
    from layerwise.policies import SensitivityController
    from layerwise.sensitivity import GroupEstimate, SensitivityReport

    def est(name, nsr):
        return GroupEstimate(
            name,
            100,
            param_norm=1.0,
            grad_norm=0.5,
            grad_norm_stderr=0.01,
            grad_variance=0.1,
            grad_variance_stderr=0.001,
            noise_to_signal=nsr,
        )

    report = SensitivityReport([est("a", 0.5), est("b", float("inf"))])
    decision = SensitivityController("noise").update(report, step=1)
    assert not decision.fallback
    assert decision.multipliers["b"] < decision.multipliers["a"]
