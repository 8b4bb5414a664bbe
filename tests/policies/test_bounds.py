"""The bound pieces one by one, and the chain: every guarantee at once, whatever the proposal."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from layerwise.policies.bounds import (
    Bounds,
    apply_bounds,
    clamp,
    limit_change,
    limit_spread,
    replace_nonfinite,
    spread_band,
    violations,
)

ANY_FLOAT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, 5e-324, 1e308, -1.0]),
)


@st.composite
def bounds(draw) -> Bounds:
    lo = draw(st.floats(1e-3, 1.0))
    hi = draw(st.floats(1.0, 1e3))
    return Bounds(lo, hi, draw(st.floats(1.0, 1e4)), draw(st.floats(1.0, 1e2)))


@st.composite
def previous_inside(draw, b: Bounds, names) -> dict[str, float]:
    lo, hi = b.interval()
    return {n: draw(st.floats(lo, hi)) for n in names if draw(st.booleans())}


NAMES = st.lists(st.sampled_from("abcdefg"), min_size=1, max_size=7, unique=True)


# -- Bounds validation ------------------------------------------------------------------------
BAD_BOUNDS = [
    ({"min_multiplier": 0.0}, "min_multiplier"),
    ({"min_multiplier": 1.5}, "min_multiplier"),
    ({"min_multiplier": math.nan}, "min_multiplier"),
    ({"max_multiplier": 0.5}, "max_multiplier"),
    ({"max_multiplier": math.inf}, "max_multiplier"),
    ({"max_spread": 0.9}, "max_spread"),
    ({"max_change": 0.5}, "max_change"),
    ({"max_change": math.nan}, "max_change"),
]


@pytest.mark.parametrize(("kwargs", "name"), BAD_BOUNDS, ids=[str(k) for k, _ in BAD_BOUNDS])
def test_bounds_reject_bad_values_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Bounds(**kwargs)


def test_bounds_reject_non_numbers():
    with pytest.raises(TypeError, match="max_spread"):
        Bounds(max_spread="4")
    with pytest.raises(TypeError, match="max_change"):
        Bounds(max_change=True)


# -- pieces -----------------------------------------------------------------------------------
def test_replace_nonfinite_uses_previous_or_one():
    got = replace_nonfinite(
        {"a": math.nan, "b": math.inf, "c": 0.0, "d": -2.0, "e": 3.0}, {"a": 0.7, "b": 1.2}
    )
    assert got == {"a": 0.7, "b": 1.2, "c": 1.0, "d": 1.0, "e": 3.0}


def test_clamp_projects_and_rejects_empty_interval():
    assert clamp({"a": 0.01, "b": 0.5, "c": 50.0}, 0.1, 10.0) == {"a": 0.1, "b": 0.5, "c": 10.0}
    with pytest.raises(ValueError, match="lo <= hi"):
        clamp({"a": 1.0}, 2.0, 1.0)


def test_limit_spread_uses_the_band_around_one():
    assert limit_spread({"a": 0.1, "b": 1.3, "c": 9.0}, 4.0) == {"a": 0.5, "b": 1.3, "c": 2.0}
    assert limit_spread({"a": 0.3, "b": 3.0}, 1.0) == {"a": 1.0, "b": 1.0}


def test_limit_change_is_relative_to_previous_and_one_for_new_groups():
    got = limit_change({"a": 4.0, "b": 0.1, "new": 9.0}, {"a": 2.0, "b": 0.5}, 1.5)
    assert got == {"a": 3.0, "b": 0.5 / 1.5, "new": 1.5}
    with pytest.raises(ValueError, match="max_change"):
        limit_change({"a": 1.0}, {}, 0.5)


@given(st.floats(1.0, 1e12))
def test_spread_band_is_exact_in_floats(s):
    lo, hi = spread_band(s)
    assert lo <= 1.0 <= hi
    assert hi / lo <= s


# -- the chain --------------------------------------------------------------------------------
def test_chain_notes_name_each_piece_that_moved_a_group():
    m, notes = apply_bounds(
        {"a": math.nan, "b": 50.0, "c": 1.1}, {"a": 1.2}, Bounds(max_spread=4, max_change=1.5)
    )
    assert m == {"a": 1.2, "b": 1.5, "c": 1.1}
    assert notes["a"] == ["non-finite: nan -> 1.2"]
    assert notes["b"] == ["min/max: 50 -> 10", "max_spread: 10 -> 2", "max_change: 2 -> 1.5"]
    assert notes["c"] == []


def test_chain_projects_a_previous_value_outside_the_bounds_and_says_so():
    m, notes = apply_bounds({"a": 1.0}, {"a": 7.0}, Bounds(max_spread=4, max_change=1.5))
    assert m == {"a": 4.0 / 3.0}  # previous taken as 2.0, then at most a factor 1.5 down
    assert "outside the bounds, taken as 2" in notes["a"][0]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), b=bounds(), names=NAMES)
def test_chain_output_meets_every_guarantee_at_once(data, b, names):
    proposed = {n: data.draw(ANY_FLOAT) for n in names}
    previous = data.draw(previous_inside(b, names))
    m, _ = apply_bounds(proposed, previous, b)
    assert list(m) == names
    assert violations(m, previous, b) == []


@settings(max_examples=60, deadline=None)
@given(data=st.data(), b=bounds(), names=NAMES)
def test_chain_equals_projection_onto_the_intersection_in_any_order(data, b, names):
    proposed = {n: data.draw(st.floats(1e-6, 1e6)) for n in names}
    previous = data.draw(previous_inside(b, names))
    m, _ = apply_bounds(proposed, previous, b)
    blo, bhi = spread_band(b.max_spread)
    for n in names:
        p = previous.get(n, 1.0)
        lo = max(b.min_multiplier, blo, p / b.max_change)
        hi = min(b.max_multiplier, bhi, p * b.max_change)
        assert lo <= hi
        assert m[n] == min(max(proposed[n], lo), hi)
    pieces = [
        lambda x: clamp(x, b.min_multiplier, b.max_multiplier),
        lambda x: limit_spread(x, b.max_spread),
        lambda x: limit_change(x, previous, b.max_change),
    ]
    for order in itertools.permutations(pieces):
        x = dict(proposed)
        for piece in order:
            x = piece(x)
        assert x == m


@settings(max_examples=60, deadline=None)
@given(data=st.data(), b=bounds(), x=st.floats(1e-6, 1e6), y=st.floats(1e-6, 1e6))
def test_chain_is_monotone_in_each_groups_own_proposal(data, b, x, y):
    previous = data.draw(previous_inside(b, ["a", "b"]))
    other = data.draw(st.floats(1e-6, 1e6))
    lo, hi = sorted((x, y))
    m_lo, _ = apply_bounds({"a": lo, "b": other}, previous, b)
    m_hi, _ = apply_bounds({"a": hi, "b": other}, previous, b)
    assert m_lo["a"] <= m_hi["a"]


def test_violations_reports_each_broken_guarantee():
    b = Bounds(min_multiplier=0.1, max_multiplier=10.0, max_spread=4.0, max_change=1.5)
    assert violations({"a": 1.0, "b": 1.4}, {}, b) == []
    assert "not finite" in violations({"a": math.nan}, {}, b)[0]
    assert "outside [0.1, 10.0]" in violations({"a": 20.0}, {}, b)[0]
    assert "more than a factor 1.5" in violations({"a": 1.6}, {}, b)[0]
    assert violations({"a": 1.6}, {}, b, check_change=False) == []
    assert "exceeds max_spread" in violations({"a": 0.5, "b": 2.1}, {"b": 2.0}, b)[-1]


def test_apply_bounds_rejects_a_non_bounds_object():
    with pytest.raises(TypeError, match="bounds must be a Bounds"):
        apply_bounds({"a": 1.0}, {}, {"max_spread": 4})
