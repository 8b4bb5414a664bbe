"""Smoothing of a rule's inputs across recalibrations: a bias-corrected EMA in log space.

Per group and input, with ``β = decay`` and ``x_k = log q_k`` the k-th measurement fed::

    m_k = β m_{k-1} + (1-β) x_k,          mean_k = m_k / (1 - β^k)
    v_k = β² v_{k-1} + (1-β)² r_k²,       stderr_k = sqrt(v_k) / (1 - β^k)

``mean_k`` is the weighted mean ``Σ w_i x_i`` with weights ``w_i = (1-β) β^(k-i) / (1-β^k)`` that
sum to 1 (Adam's bias correction), and ``stderr_k = sqrt(Σ w_i² r_i²)`` is its standard error when
the measurements are independent and ``r_i``, the relative standard error of ``q_i``, is the
standard error of ``log q_i`` (delta method). With constant ``r`` it falls towards
``r sqrt((1-β)/(1+β))``: at ``β = 1/2`` three measurements' worth. ``β = 0`` means no smoothing.
Log space makes the average scale-free and its result positive.

A measurement whose log is not finite, or whose relative stderr is NaN or above ``limit``, is not
fed (it says nothing about its log): :meth:`LogEMA.feed` returns a reason instead, and the
group's previous state is kept. Fed relative stderrs are capped at 1e6 so the state stays finite.

>>> ema = LogEMA(0.5)
>>> from layerwise.policies.rules import Measurement
>>> ema.feed("a", {"q": Measurement(0.0, 0.1)}, limit=10.0)
({'q': 0.0}, {'q': 0.1})
>>> logs, rels = ema.feed("a", {"q": Measurement(3.0, 0.1)}, limit=10.0)
>>> logs["q"]  # (0.25 * 0 + 0.5 * 3) / 0.75
2.0
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["LogEMA"]

_REL_CAP = 1e6


class LogEMA:
    """Bias-corrected EMA of log inputs with their standard errors, per group and input."""

    def __init__(self, decay: float) -> None:
        if not (isinstance(decay, int | float) and 0.0 <= decay < 1.0):
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.entries: dict[str, dict[str, list[float]]] = {}

    def reset(self) -> None:
        """Forget every group (after a fallback: the state may hold the disturbance)."""
        self.entries.clear()

    def feed(
        self, group: str, inputs: Mapping[str, Any], *, limit: float
    ) -> tuple[dict[str, float], dict[str, float]] | str:
        """Feed one group's measurements (``{input: Measurement}``); return the smoothed
        ``(logs, rel_stderrs)``, or the reason nothing was fed."""
        bad = [
            k
            for k, m in inputs.items()
            if not math.isfinite(m.log_value) or math.isnan(m.rel_stderr) or m.rel_stderr < 0
        ]
        if bad:
            return f"non-finite measurement of {', '.join(bad)}"
        noisy = [f"{k} {m.rel_stderr:.3g}" for k, m in inputs.items() if m.rel_stderr > limit]
        if noisy:
            return f"relative stderr of {', '.join(noisy)} > {limit:g}: not used"
        b = self.decay
        state = self.entries.setdefault(group, {})
        logs, rels = {}, {}
        for k, m in inputs.items():
            r = min(m.rel_stderr, _REL_CAP)
            mean, var, count = state.get(k, [0.0, 0.0, 0])
            mean = b * mean + (1.0 - b) * m.log_value
            var = b * b * var + (1.0 - b) ** 2 * r * r
            count = int(count) + 1
            state[k] = [mean, var, count]
            norm = 1.0 - b**count
            logs[k], rels[k] = mean / norm, math.sqrt(var) / norm
        return logs, rels

    def state_dict(self) -> dict[str, dict[str, list[float]]]:
        """``{group: {input: [biased mean, biased variance, count]}}``."""
        return {g: {k: list(v) for k, v in s.items()} for g, s in self.entries.items()}

    def load_state_dict(self, state: Any) -> None:
        """Inverse of :meth:`state_dict`; a malformed entry is a ValueError naming it."""
        if not isinstance(state, Mapping):
            raise ValueError(f"smoothing state must be a mapping, got {state!r}")
        entries: dict[str, dict[str, list[float]]] = {}
        for group, inputs in state.items():
            if not isinstance(inputs, Mapping):
                raise ValueError(f"smoothing state of group {group!r} must be a mapping")
            entries[group] = {}
            for k, e in inputs.items():
                ok = isinstance(e, list | tuple) and len(e) == 3
                ok = ok and all(isinstance(x, int | float) and math.isfinite(x) for x in e)
                ok = ok and e[1] >= 0 and isinstance(e[2], int) and e[2] >= 1
                if not ok:
                    raise ValueError(
                        f"smoothing state of {group!r}/{k!r} must be [mean, var >= 0, "
                        f"count >= 1], got {e!r}"
                    )
                entries[group][k] = [float(e[0]), float(e[1]), int(e[2])]
        self.entries = entries
