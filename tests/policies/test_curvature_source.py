"""The curvature rule's source: ``"auto"`` reads the Gauss-Newton trace when the report has
one and the Hessian trace otherwise, ``"ggn"`` and ``"hessian"`` read one of them only; each
declares what it reads, is registered under its own name, and survives the controller's
plain-data round trip. A negative or non-finite ``ggn_trace`` is an unhealthy report."""

from __future__ import annotations

import math

import pytest

from layerwise.policies import RULES, SensitivityController, make_rule
from layerwise.policies.rules import CURVATURE_SOURCES, CompositeRule, CurvatureRule, normalise
from layerwise.policies.safety import report_problems
from layerwise.sensitivity import GroupEstimate, SensitivityReport


def report(*rows: tuple[str, int, dict]) -> SensitivityReport:
    return SensitivityReport([GroupEstimate(name, n, **kw) for name, n, kw in rows])


BOTH = report(
    ("a", 10, {"hessian_trace": -4.0, "ggn_trace": 40.0, "ggn_trace_stderr": 4.0}),
    ("b", 30, {"hessian_trace": 3.0, "ggn_trace": 3.0, "ggn_trace_stderr": 0.3}),
)
HESSIAN_ONLY = report(("a", 10, {"hessian_trace": 40.0}), ("b", 30, {"hessian_trace": 3.0}))


def _per_param(measured, key):
    return {g: math.exp(m[key].log_value) for g, m in measured.items()}


def test_auto_reads_the_ggn_trace_when_the_report_has_it():
    measured = CurvatureRule().measure(BOTH)
    assert _per_param(measured, "ggn_curvature") == pytest.approx({"a": 4.0, "b": 0.1})
    assert measured["a"]["ggn_curvature"].rel_stderr == pytest.approx(0.1)
    assert all(set(m) == {"ggn_curvature"} for m in measured.values())
    measured = CurvatureRule().measure(HESSIAN_ONLY)
    assert _per_param(measured, "curvature") == pytest.approx({"a": 4.0, "b": 0.1})
    assert CurvatureRule().source_of(BOTH) == "ggn"
    assert CurvatureRule().source_of(HESSIAN_ONLY) == "hessian"


def test_explicit_sources_read_one_trace_only():
    hessian = CurvatureRule(source="hessian").measure(BOTH)
    # the Hessian block of "a" is negative: floored at 1% of the positive mean
    floor = 0.01 * (30 * 0.1) / 40
    assert _per_param(hessian, "curvature") == pytest.approx({"a": floor, "b": 0.1})
    ggn = CurvatureRule(source="ggn").measure(HESSIAN_ONLY)
    assert ggn == {g: "no finite ggn_trace (or no parameters) in the report" for g in "ab"}


def test_the_ggn_source_gives_the_power_law_of_its_traces():
    rule = make_rule("curvature_ggn")
    measured = rule.measure(BOTH)
    scores = {g: rule.score({k: m.log_value for k, m in v.items()}) for g, v in measured.items()}
    m = normalise(scores, {"a": 10, "b": 30}, alpha=0.5)
    ref = 4.0**0.25 * 0.1**0.75  # the parameter-weighted geometric mean of 4 and 0.1
    assert m == pytest.approx({"a": (ref / 4.0) ** 0.5, "b": (ref / 0.1) ** 0.5}, rel=1e-12)
    ctrl = SensitivityController(rule, alpha=0.5, max_rel_stderr=math.inf)
    decision = ctrl.update(BOTH, step=1)
    assert decision.multipliers["b"] > 1 > decision.multipliers["a"]  # then bounded
    assert decision.reasons["a"].startswith("curvature_ggn: ggn_curvature 4 ")


@pytest.mark.parametrize(
    ("name", "source", "quantities"),
    [
        ("curvature", "auto", ("hessian_trace",)),
        ("curvature_hessian", "hessian", ("hessian_trace",)),
        ("curvature_ggn", "ggn", ("ggn_trace",)),
    ],
)
def test_each_source_is_registered_and_declares_what_it_reads(name, source, quantities):
    rule = make_rule(name)
    assert name in RULES and rule.name == name and rule.source == source
    assert rule.quantities == quantities
    assert CurvatureRule(source=source).name == name
    ctrl = SensitivityController(name, alpha=0.5)
    assert SensitivityController.from_dict(ctrl.settings).rule == rule


def test_a_composition_of_both_sources_reads_both_traces():
    rule = make_rule("curvature_hessian+curvature_ggn")
    assert isinstance(rule, CompositeRule)
    assert rule.quantities == ("hessian_trace", "ggn_trace")
    measured = rule.measure(BOTH)
    assert set(measured["b"]) == {"curvature", "ggn_curvature"}


def test_an_unknown_source_is_refused_by_name():
    with pytest.raises(ValueError, match=r"source must be one of \('auto', 'ggn', 'hessian'\)"):
        CurvatureRule(source="fisher")
    assert CURVATURE_SOURCES == ("auto", "ggn", "hessian")


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"ggn_trace": -1.0}, "impossible negative estimate in group a (ggn_trace=-1.0)"),
        ({"ggn_trace": math.nan}, "non-finite estimate in group a (ggn_trace=nan)"),
        ({"ggn_trace": 1.0, "ggn_trace_stderr": -1.0}, "ggn_trace_stderr=-1.0"),
    ],
)
def test_an_impossible_ggn_trace_makes_the_report_unhealthy(fields, problem):
    problems = report_problems(report(("a", 3, fields)))
    assert any(problem in p for p in problems), problems
