"""Bounds on the controller's multipliers: small pieces, chained as the visible last step.

Every piece maps ``{group: multiplier}`` to a new mapping and is a pure function:

* :func:`replace_nonfinite` -- a proposal that is not a finite positive number is replaced by
  the group's previous multiplier (1 for a group not seen before);
* :func:`clamp` -- into ``[min_multiplier, max_multiplier]``;
* :func:`limit_spread` -- into the band ``[1/sqrt(S), sqrt(S)]`` around 1, the parameter-weighted
  geometric mean that the rules normalise to, so that ``max / min <= S = max_spread``;
* :func:`limit_change` -- into ``[previous / C, previous * C]``, ``C = max_change``.

:func:`apply_bounds` chains them in that order; no rule can skip it (the controller calls it
on every proposal) and :func:`violations` states the guarantees as a checkable list.

Why the band for the spread is centred on 1 rather than fitted to each proposal: a window that
floats with the proposal makes the result of one group depend on every other group's proposal
(raising one group's curvature can then *raise* its multiplier through the window) and makes the
order of the pieces matter. A fixed band keeps every piece a projection onto a per-group
interval that does not depend on the proposal, which gives the proof below, order
independence, and monotonicity of the whole chain. The price: a lopsided proposal (one small
group far from 1, the rest near 1) is limited to ``[1/sqrt(S), sqrt(S)]`` even where a shifted
window of ratio S would have held it, which errs on the conservative side.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = [
    "Bounds",
    "apply_bounds",
    "clamp",
    "limit_change",
    "limit_spread",
    "replace_nonfinite",
    "spread_band",
    "violations",
]


def _check_factor(name: str, value: float, *, at_least: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value >= at_least):
        raise ValueError(f"{name} must be finite and >= {at_least}, got {value!r}")
    return value


@dataclass(frozen=True)
class Bounds:
    """The limits every multiplier obeys: ``0 < min_multiplier <= 1 <= max_multiplier``,
    ``max_spread >= 1`` (largest over smallest), ``max_change >= 1`` (factor per recalibration)."""

    min_multiplier: float = 0.1
    max_multiplier: float = 10.0
    max_spread: float = 4.0
    max_change: float = 1.5

    def __post_init__(self) -> None:
        lo = _check_factor("min_multiplier", self.min_multiplier, at_least=0.0)
        hi = _check_factor("max_multiplier", self.max_multiplier, at_least=1.0)
        if not 0.0 < lo <= 1.0:
            raise ValueError(f"min_multiplier must be in (0, 1], got {self.min_multiplier!r}")
        object.__setattr__(self, "min_multiplier", lo)
        object.__setattr__(self, "max_multiplier", hi)
        for name in ("max_spread", "max_change"):
            object.__setattr__(self, name, _check_factor(name, getattr(self, name), at_least=1.0))

    def interval(self) -> tuple[float, float]:
        """``[min_multiplier, max_multiplier]`` intersected with the spread band (contains 1)."""
        blo, bhi = spread_band(self.max_spread)
        return max(self.min_multiplier, blo), min(self.max_multiplier, bhi)


def spread_band(max_spread: float) -> tuple[float, float]:
    """``(lo, hi)`` with ``lo <= 1 <= hi`` and ``hi / lo <= max_spread`` exactly in floats.

    >>> spread_band(4.0)
    (0.5, 2.0)
    """
    s = _check_factor("max_spread", max_spread, at_least=1.0)
    hi = math.sqrt(s)
    lo = min(1.0, hi / s)
    while hi / lo > s:  # one ulp of rounding at most; keep the guarantee exact
        lo = math.nextafter(lo, math.inf)
    return lo, hi


def replace_nonfinite(
    proposed: Mapping[str, float], previous: Mapping[str, float]
) -> dict[str, float]:
    """Keep finite positive proposals; replace any other (nan, inf, 0, negative) by the
    group's previous multiplier, or 1 for a group not seen before."""
    out = {}
    for name, value in proposed.items():
        ok = isinstance(value, int | float) and math.isfinite(value) and value > 0
        out[name] = float(value) if ok else float(previous.get(name, 1.0))
    return out


def clamp(multipliers: Mapping[str, float], lo: float, hi: float) -> dict[str, float]:
    """Project every multiplier onto ``[lo, hi]``."""
    if not lo <= hi:
        raise ValueError(f"clamp needs lo <= hi, got lo={lo!r}, hi={hi!r}")
    return {k: min(max(float(v), lo), hi) for k, v in multipliers.items()}


def limit_spread(multipliers: Mapping[str, float], max_spread: float) -> dict[str, float]:
    """Project onto the band of :func:`spread_band`, so largest / smallest <= ``max_spread``."""
    return clamp(multipliers, *spread_band(max_spread))


def limit_change(
    multipliers: Mapping[str, float], previous: Mapping[str, float], max_change: float
) -> dict[str, float]:
    """Project each multiplier onto ``[p / max_change, p * max_change]``, ``p`` its previous
    multiplier (1 for a group not seen before)."""
    c = _check_factor("max_change", max_change, at_least=1.0)
    out = {}
    for name, value in multipliers.items():
        p = float(previous.get(name, 1.0))
        out[name] = min(max(float(value), p / c), p * c)
    return out


def _project_previous(previous: Mapping[str, float], bounds: Bounds, names) -> dict[str, float]:
    lo, hi = bounds.interval()
    out = {}
    for name in names:
        p = previous.get(name, 1.0)
        p = float(p) if isinstance(p, int | float) and math.isfinite(p) and p > 0 else 1.0
        out[name] = min(max(p, lo), hi)
    return out


def apply_bounds(
    proposed: Mapping[str, float], previous: Mapping[str, float], bounds: Bounds
) -> tuple[dict[str, float], dict[str, list[str]]]:
    """The chain: finiteness, ``[min, max]``, spread, change. Returns the multipliers and, per
    group, notes naming each piece that moved it.

    Guarantee: every result is finite, in ``[min_multiplier, max_multiplier]``, inside the
    spread band (so largest / smallest <= ``max_spread``) and within a factor ``max_change`` of
    the previous multiplier.

    Proof. After :func:`replace_nonfinite` each value is finite and positive. The three other
    pieces are projections of each group's value onto intervals A = [min, max],
    B = [1/sqrt(S), sqrt(S)] and C_g = [p_g / C, p_g * C] that do not depend on the proposal.
    For intervals with A ∩ B non-empty, clamping into A and then into B equals clamping into
    A ∩ B (if the value lies below A ∩ B it ends at max(lo_A, lo_B), above it at
    min(hi_A, hi_B), inside it is unchanged), and by induction the chain equals the projection
    onto A ∩ B ∩ C_g, whenever that is non-empty. It is: p_g lies in all three. The previous
    multipliers produced by this chain lie in A ∩ B, as does 1 (a new group, or a fallback),
    because min <= 1 <= max and the band contains 1; a previous value that does not (state
    from elsewhere) is first projected onto A ∩ B and a note says so. The result therefore
    lies in every interval at once, the order of the pieces does not matter, and each result
    is a non-decreasing function of its own proposal.

    >>> m, notes = apply_bounds({"a": 9.0, "b": 0.9}, {}, Bounds(max_spread=4.0, max_change=1.5))
    >>> m
    {'a': 1.5, 'b': 0.9}
    >>> notes["a"]
    ['max_spread: 9 -> 2', 'max_change: 2 -> 1.5']
    """
    if not isinstance(bounds, Bounds):
        raise TypeError(f"bounds must be a Bounds, got {type(bounds).__name__}")
    names = list(proposed)
    prev = _project_previous(previous, bounds, names)
    notes: dict[str, list[str]] = {name: [] for name in names}
    for name in names:
        given = previous.get(name, 1.0)
        if given != prev[name]:
            notes[name].append(f"previous {given!r} outside the bounds, taken as {prev[name]:.4g}")
    steps = (
        ("non-finite", lambda m: replace_nonfinite(m, prev)),
        ("min/max", lambda m: clamp(m, bounds.min_multiplier, bounds.max_multiplier)),
        ("max_spread", lambda m: limit_spread(m, bounds.max_spread)),
        ("max_change", lambda m: limit_change(m, prev, bounds.max_change)),
    )
    current: dict[str, float] = dict(proposed)
    for label, piece in steps:
        after = piece(current)
        for name in names:
            if after[name] != current[name]:
                notes[name].append(f"{label}: {current[name]:.4g} -> {after[name]:.4g}")
        current = after
    return current, notes


def violations(
    multipliers: Mapping[str, float],
    previous: Mapping[str, float],
    bounds: Bounds,
    *,
    check_change: bool = True,
) -> list[str]:
    """Every guarantee of :func:`apply_bounds` that ``multipliers`` break (empty when none).

    The change limit is checked against ``previous`` (1 for a group missing there) unless
    ``check_change`` is False (a fallback jumps to 1 on purpose).
    """
    out = []
    values = dict(multipliers)
    for name, v in values.items():
        if not (isinstance(v, int | float) and math.isfinite(v)):
            out.append(f"{name}: multiplier {v!r} is not finite")
        elif not bounds.min_multiplier <= v <= bounds.max_multiplier:
            out.append(
                f"{name}: multiplier {v!r} outside [{bounds.min_multiplier}, "
                f"{bounds.max_multiplier}]"
            )
        elif check_change:
            p = float(previous.get(name, 1.0))
            if not p / bounds.max_change <= v <= p * bounds.max_change:
                out.append(
                    f"{name}: multiplier {v!r} moved from {p!r} by more than a factor "
                    f"{bounds.max_change}"
                )
    finite = [v for v in values.values() if isinstance(v, int | float) and math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > bounds.max_spread:
        out.append(f"spread {max(finite) / min(finite)!r} exceeds max_spread {bounds.max_spread}")
    return out
