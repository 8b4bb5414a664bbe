"""Each schedule equals its float64 closed form at many steps; specs round-trip; bad input fails."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from layerwise.policies import schedules as S

STEPS = np.array([*range(0, 400), 999, 1000, 1001, 12_345, 10**6], dtype=np.int64)


def _cos(t, T, floor):
    t = np.minimum(t, T).astype(np.float64)
    return floor + (1.0 - floor) * 0.5 * (1.0 + np.cos(np.pi * t / T))


def _restarts(period, mult, decay, floor):
    """Cycle starts as a cumulative sum of cycle lengths, located by binary search."""

    def ref(t):
        if mult == 1:
            lengths = np.full(t.max() // period + 1, period, dtype=np.int64)
        else:
            lengths = [period]
            while sum(lengths) <= t.max():
                lengths.append(lengths[-1] * mult)
            lengths = np.array(lengths, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        index = np.searchsorted(starts, t, side="right") - 1
        since, length = t - starts[index], lengths[index]
        peak = np.maximum(decay ** index.astype(np.float64), floor)
        return floor + (peak - floor) * 0.5 * (1.0 + np.cos(np.pi * since / length))

    return ref


# (id, schedule, float64 reference as a vectorised function of the step array)
CASES = [
    ("constant", S.constant(), lambda t: np.ones_like(t, dtype=np.float64)),
    ("constant_0.3", S.constant(0.3), lambda t: np.full(t.shape, 0.3)),
    ("warmup_10", S.linear_warmup(10), lambda t: np.minimum(t, 10) / 10.0),
    ("warmup_7_init", S.linear_warmup(7, 0.2), lambda t: 0.2 + 0.8 * np.minimum(t, 7) / 7.0),
    ("warmup_1", S.linear_warmup(1, 0.5), lambda t: np.where(t >= 1, 1.0, 0.5)),
    ("step_30", S.step(30), lambda t: 0.1 ** (t // 30).astype(np.float64)),
    ("step_1_half", S.step(1, 0.5), lambda t: 0.5 ** t.astype(np.float64)),
    (
        "multistep",
        S.multistep([5, 50, 300], gamma=0.3),
        lambda t: 0.3 ** ((t >= 5).astype(float) + (t >= 50) + (t >= 300)),
    ),
    ("exponential", S.exponential(0.99), lambda t: np.exp(t * np.log(0.99))),
    ("exponential_1", S.exponential(1.0), lambda t: np.ones(t.shape)),
    ("cosine_100", S.cosine(100), lambda t: _cos(t, 100, 0.0)),
    ("cosine_37_floor", S.cosine(37, floor=0.05), lambda t: _cos(t, 37, 0.05)),
    ("cosine_1", S.cosine(1), lambda t: _cos(t, 1, 0.0)),
    ("restarts_T10", S.cosine_warm_restarts(10), _restarts(10, 1, 1.0, 0.0)),
    ("restarts_T3x2", S.cosine_warm_restarts(3, 2, floor=0.1), _restarts(3, 2, 1.0, 0.1)),
    (
        "restarts_decay",
        S.cosine_warm_restarts(7, 3, decay=0.5, floor=0.02),
        _restarts(7, 3, 0.5, 0.02),
    ),
    ("restarts_T1", S.cosine_warm_restarts(1, decay=0.9), _restarts(1, 1, 0.9, 0.0)),
    ("polynomial_lin", S.polynomial(80), lambda t: 1.0 - np.minimum(t, 80) / 80.0),
    (
        "polynomial_sq_floor",
        S.polynomial(50, power=2.0, floor=0.1),
        lambda t: 0.1 + 0.9 * (1.0 - np.minimum(t, 50) / 50.0) ** 2,
    ),
    ("polynomial_sqrt", S.polynomial(9, power=0.5), lambda t: (1 - np.minimum(t, 9) / 9) ** 0.5),
    (
        "join_warmup_cosine",
        S.join([S.linear_warmup(20, 0.01), S.cosine(180, floor=0.1)], [20]),
        lambda t: np.where(t < 20, 0.01 + 0.99 * t / 20.0, _cos(t - 20, 180, 0.1)),
    ),
    (
        "join_three",
        S.join([S.constant(0.5), S.step(10, 0.5), S.exponential(0.9)], [3, 53]),
        lambda t: np.select(
            [t < 3, t < 53], [np.full(t.shape, 0.5), 0.5 ** ((t - 3) // 10)], 0.9 ** (t - 53.0)
        ),
    ),
    (
        "join_nested",
        S.join([S.join([S.constant(0.2), S.linear_warmup(4)], [2]), S.cosine(10)], [6]),
        lambda t: np.select(
            [t < 2, t < 6], [np.full(t.shape, 0.2), (t - 2) / 4], _cos(t - 6, 10, 0)
        ),
    ),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize(("schedule", "reference"), [c[1:] for c in CASES], ids=IDS)
def test_schedule_equals_closed_form_at_many_steps(schedule, reference):
    got = np.array([schedule(int(t)) for t in STEPS])
    want = reference(STEPS)
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-15)
    assert all(type(v) is float for v in got.tolist())


@pytest.mark.parametrize("schedule", [c[1] for c in CASES], ids=IDS)
def test_schedule_is_pure_and_order_independent(schedule):
    forward = [schedule(int(t)) for t in STEPS]
    backward = [schedule(int(t)) for t in STEPS[::-1]][::-1]
    assert forward == backward


@pytest.mark.parametrize("schedule", [c[1] for c in CASES], ids=IDS)
def test_spec_is_json_and_rebuilds_an_equal_schedule(schedule):
    spec = json.loads(json.dumps(schedule.spec))
    rebuilt = S.from_spec(spec)
    assert rebuilt == schedule
    assert rebuilt.spec == schedule.spec
    assert [rebuilt(int(t)) for t in STEPS] == [schedule(int(t)) for t in STEPS]


def test_every_registered_kind_has_a_closed_form_case():
    assert {c[1].name for c in CASES} == set(S.registered())


@pytest.mark.parametrize(
    ("schedule", "horizon"),
    [(S.linear_warmup(5, 0.1), 5), (S.cosine(9, 0.3), 9), (S.polynomial(6, 3.0), 6)],
)
def test_steps_past_the_horizon_hold_the_final_value(schedule, horizon):
    final = schedule(horizon)
    assert all(schedule(horizon + k) == final for k in (1, 2, 10**3, 10**9))


def test_cosine_and_polynomial_end_exactly_at_floor():
    assert S.cosine(11, floor=0.25)(11) == 0.25
    assert S.polynomial(11, power=1.7, floor=0.25)(11) == 0.25
    assert S.cosine(11)(11) == 0.0


def test_warm_restarts_cycle_bookkeeping_is_exact():
    s = S.cosine_warm_restarts(2, period_mult=3)  # cycles [0,2) [2,8) [8,26) [26,80)
    assert [s.cycle(t) for t in (0, 1, 2, 7, 8, 25, 26, 79, 80)] == [
        (0, 0, 2), (0, 1, 2), (1, 0, 6), (1, 5, 6), (2, 0, 18), (2, 17, 18),
        (3, 0, 54), (3, 53, 54), (4, 0, 162),
    ]  # fmt: skip
    assert s(2) == s(8) == s(26) == 1.0  # every restart returns to the (undecayed) peak


def test_warm_restarts_match_step_by_step_counters():
    """torch's bookkeeping: T_cur += 1 each step; at T_cur == T_i restart and T_i *= T_mult."""
    s = S.cosine_warm_restarts(3, period_mult=2, decay=0.7, floor=0.05)
    index, since, length = 0, 0, 3
    for t in range(500):
        peak = max(0.7**index, 0.05)
        want = 0.05 + (peak - 0.05) * 0.5 * (1.0 + math.cos(math.pi * since / length))
        assert s(t) == pytest.approx(want, rel=1e-14, abs=1e-16)
        since += 1
        if since == length:
            index, since, length = index + 1, 0, length * 2


def test_warm_restarts_peak_decays_per_cycle_and_is_clipped_at_floor():
    s = S.cosine_warm_restarts(4, decay=0.5, floor=0.2)
    assert [s(4 * i) for i in range(5)] == [1.0, 0.5, 0.25, 0.2, 0.2]
    assert all(s(t) == 0.2 for t in range(12, 40))


def test_join_restarts_the_step_at_each_boundary():
    inner = S.exponential(0.5)
    s = S.join([S.constant(0.1), inner, inner], [4, 6])
    assert [s(t) for t in range(9)] == [0.1] * 4 + [1.0, 0.5, 1.0, 0.5, 0.25]


def test_steps_accept_numpy_and_reject_negative_or_non_integer():
    s = S.cosine(10)
    assert s(np.int64(3)) == s(3)
    with pytest.raises(ValueError, match=r"step must be an integer >= 0, got -1"):
        s(-1)
    with pytest.raises(TypeError, match=r"step must be an integer, got 1\.5"):
        s(1.5)
    with pytest.raises(TypeError, match=r"step must be an integer, got True"):
        s(True)


BAD_ARGUMENTS = [
    (S.constant, {"value": 0.0}, ValueError, r"value must lie in \(0, inf\), got 0\.0"),
    (S.constant, {"value": float("nan")}, ValueError, r"value must be finite, got nan"),
    (S.constant, {"value": "1"}, TypeError, r"value must be a real number, got '1'"),
    (S.linear_warmup, {"steps": 0}, ValueError, r"steps must be an integer >= 1, got 0"),
    (S.linear_warmup, {"steps": 5.0}, TypeError, r"steps must be an integer, got 5\.0"),
    (
        S.linear_warmup,
        {"steps": 5, "init": 1.5},
        ValueError,
        r"init must lie in \[0, 1\], got 1\.5",
    ),
    (S.step, {"step_size": 0}, ValueError, r"step_size must be an integer >= 1, got 0"),
    (S.step, {"step_size": 3, "gamma": 2.0}, ValueError, r"gamma must lie in \(0, 1\], got 2\.0"),
    (S.step, {"step_size": 3, "gamma": True}, TypeError, r"gamma must be a real number, got True"),
    (S.multistep, {"milestones": []}, ValueError, r"milestones must not be empty"),
    (S.multistep, {"milestones": [5, 5]}, ValueError, r"strictly increasing, got \[5, 5\]"),
    (S.multistep, {"milestones": [3, 0]}, ValueError, r"milestones\[1\] must be an integer >= 1"),
    (S.multistep, {"milestones": "12"}, TypeError, r"milestones must be a sequence of integers"),
    (S.exponential, {"gamma": 0.0}, ValueError, r"gamma must lie in \(0, 1\], got 0\.0"),
    (S.exponential, {"gamma": float("inf")}, ValueError, r"gamma must be finite, got inf"),
    (S.cosine, {"total_steps": -3}, ValueError, r"total_steps must be an integer >= 1, got -3"),
    (S.cosine, {"total_steps": 10, "floor": -0.1}, ValueError, r"floor must lie in \[0, 1\]"),
    (S.cosine_warm_restarts, {"period": 0}, ValueError, r"period must be an integer >= 1, got 0"),
    (S.cosine_warm_restarts, {"period": 2, "period_mult": 1.5}, TypeError, r"period_mult must"),
    (S.cosine_warm_restarts, {"period": 2, "decay": 0}, ValueError, r"decay must lie in \(0, 1\]"),
    (S.polynomial, {"total_steps": 5, "power": 0}, ValueError, r"power must lie in \(0, inf\)"),
    (
        S.polynomial,
        {"total_steps": 5, "floor": 2},
        ValueError,
        r"floor must lie in \[0, 1\], got 2",
    ),
    (S.join, {"schedules": [], "boundaries": []}, ValueError, r"at least one schedule"),
    (S.join, {"schedules": [S.constant()], "boundaries": [3]}, ValueError, r"one fewer entry"),
    (S.join, {"schedules": [S.constant(), len], "boundaries": [3]}, TypeError, r"schedules\[1\]"),
    (S.join, {"schedules": S.constant(), "boundaries": []}, TypeError, r"sequence of schedules"),
    (S.join, {"schedules": [S.constant()] * 3, "boundaries": [4, 2]}, ValueError, r"increasing"),
    (S.join, {"schedules": [S.constant()] * 2, "boundaries": [0]}, ValueError, r"boundaries\[0\]"),
]


@pytest.mark.parametrize(
    ("factory", "kwargs", "error", "message"),
    BAD_ARGUMENTS,
    ids=[f"{f.__name__}-{'-'.join(map(str, k))}-{i}" for i, (f, k, *_) in enumerate(BAD_ARGUMENTS)],
)
def test_factories_reject_bad_arguments_naming_them(factory, kwargs, error, message):
    with pytest.raises(error, match=message):
        factory(**kwargs)


def test_schedules_are_frozen_and_hashable():
    s = S.cosine(10)
    with pytest.raises(AttributeError):
        s.total_steps = 5
    assert len({S.cosine(10), S.cosine(10), S.cosine(11)}) == 2


@pytest.mark.parametrize(
    ("spec", "error", "message"),
    [
        ([("name", "cosine")], TypeError, r"spec must be a mapping"),
        ({"total_steps": 3}, ValueError, r"spec must have a string 'name'"),
        ({"name": "cosin", "total_steps": 3}, ValueError, r"unknown schedule name 'cosin'"),
        ({"name": "cosine", "steps": 3}, ValueError, r"unknown argument\(s\) \['steps'\]"),
        ({"name": "cosine"}, ValueError, r"missing argument\(s\) \['total_steps'\]"),
        ({"name": "cosine", "total_steps": 0}, ValueError, r"total_steps must be an integer >= 1"),
        (
            {
                "name": "join",
                "schedules": [{"name": "step"}, {"name": "constant"}],
                "boundaries": [1],
            },
            ValueError,
            r"missing argument\(s\) \['step_size'\] for schedule 'step'",
        ),
    ],
)
def test_from_spec_rejects_bad_specs_saying_why(spec, error, message):
    with pytest.raises(error, match=message):
        S.from_spec(spec)


def test_from_spec_fills_defaults_and_accepts_toml_style_lists():
    assert S.from_spec({"name": "cosine", "total_steps": 10}) == S.cosine(10, floor=0.0)
    assert S.from_spec({"name": "multistep", "milestones": [2, 4]}) == S.multistep((2, 4), 0.1)
