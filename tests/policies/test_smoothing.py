"""The log-space EMA with bias correction: closed forms of the mean and of its standard error."""

from __future__ import annotations

import math

import pytest

from layerwise.policies.rules import Measurement
from layerwise.policies.smoothing import LogEMA


def feed(ema: LogEMA, *values: tuple[float, float], limit: float = 10.0):
    out = None
    for log_value, rel in values:
        out = ema.feed("g", {"q": Measurement(log_value, rel)}, limit=limit)
    return out


def test_first_value_comes_back_unchanged_thanks_to_bias_correction():
    assert feed(LogEMA(0.9), (1.5, 0.2)) == ({"q": 1.5}, {"q": pytest.approx(0.2)})


def test_three_values_match_the_weighted_mean_closed_form():
    b = 0.5
    logs, rels = feed(LogEMA(b), (1.0, 0.3), (2.0, 0.1), (4.0, 0.2))
    w = [(1 - b) * b**2, (1 - b) * b, 1 - b]
    norm = 1 - b**3
    assert logs["q"] == pytest.approx((w[0] * 1 + w[1] * 2 + w[2] * 4) / norm, rel=1e-14)
    var = (w[0] * 0.3) ** 2 + (w[1] * 0.1) ** 2 + (w[2] * 0.2) ** 2
    assert rels["q"] == pytest.approx(math.sqrt(var) / norm, rel=1e-14)


def test_stderr_of_a_long_run_tends_to_r_sqrt_of_one_minus_over_one_plus_decay():
    b, r = 0.5, 0.6
    _, rels = feed(LogEMA(b), *[(0.0, r)] * 60)
    assert rels["q"] == pytest.approx(r * math.sqrt((1 - b) / (1 + b)), rel=1e-12)


def test_constant_input_stays_constant_and_decay_zero_means_no_smoothing():
    logs, _ = feed(LogEMA(0.7), *[(math.log(3.0), 0.0)] * 5)
    assert logs["q"] == pytest.approx(math.log(3.0), rel=1e-14)
    assert feed(LogEMA(0.0), (1.0, 0.1), (5.0, 0.4)) == ({"q": 5.0}, {"q": 0.4})


@pytest.mark.parametrize(
    ("measurement", "match"),
    [
        (Measurement(math.nan, 0.1), "non-finite"),
        (Measurement(-math.inf, 0.1), "non-finite"),
        (Measurement(0.0, math.nan), "non-finite"),
        (Measurement(0.0, 11.0), "relative stderr of q 11 > 10"),
        (Measurement(0.0, math.inf), "relative stderr"),
    ],
    ids=["nan", "minus-inf", "nan-stderr", "too-noisy", "inf-stderr"],
)
def test_unusable_measurements_are_not_fed(measurement, match):
    ema = LogEMA(0.5)
    feed(ema, (1.0, 0.1))
    before = ema.state_dict()
    got = ema.feed("g", {"q": measurement}, limit=10.0)
    assert isinstance(got, str) and match in got
    assert ema.state_dict() == before


def test_a_huge_limit_feeds_a_capped_stderr_and_keeps_the_state_finite():
    ema = LogEMA(0.5)
    _, rels = feed(ema, (1.0, math.inf), limit=math.inf)
    assert rels["q"] == 1e6
    assert all(math.isfinite(x) for x in ema.state_dict()["g"]["q"])


def test_state_round_trip_and_reset():
    ema = LogEMA(0.5)
    feed(ema, (1.0, 0.1), (2.0, 0.2))
    twin = LogEMA(0.5)
    twin.load_state_dict(ema.state_dict())
    assert feed(twin, (3.0, 0.1)) == feed(ema, (3.0, 0.1))
    ema.reset()
    assert ema.state_dict() == {}


@pytest.mark.parametrize(
    "state",
    [[1, 2], {"g": [1.0]}, {"g": {"q": [0.0, -1.0, 1]}}, {"g": {"q": [0.0, 0.0, 0]}}],
    ids=["not-a-mapping", "group-not-a-mapping", "negative-variance", "zero-count"],
)
def test_malformed_state_is_rejected(state):
    with pytest.raises(ValueError, match="smoothing state"):
        LogEMA(0.5).load_state_dict(state)


def test_decay_is_validated():
    with pytest.raises(ValueError, match="decay"):
        LogEMA(1.0)
