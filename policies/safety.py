"""Sanity checks and the fallback to the uniform rate: small state machines over plain data.

* :func:`report_problems` -- a report is unhealthy when an estimate is non-finite
  (``param_norm``, ``grad_norm``, ``grad_variance``, ``noise_to_signal``, ``hessian_trace``,
  ``ggn_trace``) or negative where that is impossible (the norms, every standard error, and
  ``ggn_trace``: the Gauss-Newton matrix is positive semi-definite). A negative
  ``hessian_trace`` is possible (non-convex loss) and a negative ``grad_variance`` or
  ``noise_to_signal`` can come from unbiased two-batch estimators: the rules handle those. A
  non-finite *standard error* only makes the group's estimate untrusted (the controller keeps
  its multiplier); it is not a fallback. ``noise_to_signal = +inf`` is not a problem either:
  the estimator reports it when the unbiased estimate of ‖G‖² is not positive, i.e. when no
  signal is detectable above the sampling noise, a legitimate (and common) state of a group.
* :class:`SpikeMonitor` -- a group's ``grad_norm`` above ``factor`` times its running average.
  The average is a bias-corrected EMA of ``log grad_norm`` (a geometric running mean: norms span
  orders of magnitude), fed after the check with the value winsorised at the spike threshold,
  so one spike cannot inflate the reference while a lasting level shift is absorbed within a
  few recalibrations (each report lifts the average by at most ``factor ** (1 - decay)``).
* :class:`FallbackGate` -- after a fallback, ``cooldown`` recalibrations at all ones, then
  ``hysteresis`` consecutive healthy reports before adapting again (hysteresis: the report that
  completes the count is the first adapted one). An unhealthy report at any time trips it again.
* :class:`ValidationWatch` -- the validation metric while adapting, watched two ways, and a
  non-finite value trips the gate at once. With no value seen before adaptation, the first one
  seen while adapting is the reference.

  - *Worse than before*: against ``best``, the best value seen while not adapting (before
    adaptation was switched on, or during a fallback); ``patience`` consecutive worsenings
    (by more than ``min_delta``) trip the gate.
  - *Collapse*: against ``peak``, the best value seen while adapting since adaptation (re)started.
    A value whose decline from the peak exceeds ``min_delta`` and ``collapse_drop`` times
    ``max(|peak - best|, |peak|)`` is a collapse; ``collapse_patience`` consecutive collapses
    trip the gate. The first check alone misses a run that learns under adaptation and then
    breaks down: its reference may be near chance (an accuracy of 0.07 before adaptation,
    0.955 at its peak, 0.083 after the collapse is still "better than before"). The scale
    makes the threshold mean the same for an accuracy and a loss: for an accuracy in mode
    ``max`` it is about the peak itself (0.5 means losing half of the peak accuracy), for a
    loss in mode ``min`` the improvement since the reference (0.5 means climbing back half
    way to where adaptation started), so the slow decline of overfitting (a few percent of
    that) does not trip it. A fallback ends the episode: strikes and peak are forgotten.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from layerwise.policies.checks import exp_text
from layerwise.sensitivity import SensitivityReport

__all__ = ["FallbackGate", "SpikeMonitor", "ValidationWatch", "report_problems"]

ESTIMATES = (
    "param_norm",
    "grad_norm",
    "grad_variance",
    "noise_to_signal",
    "hessian_trace",
    "ggn_trace",
)
NONNEGATIVE = (
    "param_norm",
    "grad_norm",
    "grad_norm_stderr",
    "grad_variance_stderr",
    "hessian_trace_stderr",
    "hessian_probes",
    "ggn_trace",
    "ggn_trace_stderr",
    "ggn_samples",
)


def report_problems(report: SensitivityReport) -> list[str]:
    """Why ``report`` is unhealthy, one line per group and kind (empty when healthy)."""
    problems = []
    for g in report:
        bad = [
            f"{f}={getattr(g, f)!r}"
            for f in ESTIMATES
            if _nonfinite(getattr(g, f))
            and not (f == "noise_to_signal" and g.noise_to_signal == math.inf)
        ]
        if bad:
            problems.append(f"non-finite estimate in group {g.group} ({', '.join(bad)})")
        neg = [f"{f}={getattr(g, f)!r}" for f in NONNEGATIVE if _negative(getattr(g, f))]
        if neg:
            problems.append(f"impossible negative estimate in group {g.group} ({', '.join(neg)})")
    return problems


def _nonfinite(v: Any) -> bool:
    return v is not None and not math.isfinite(v)


def _negative(v: Any) -> bool:
    return v is not None and v < 0


def _from_dict(cls, data: Any, **fixed):
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__} state must be a dict, got {data!r}")
    names = set(cls.__dataclass_fields__) - set(fixed)
    if set(data) != names:
        raise ValueError(
            f"{cls.__name__} state keys differ: missing {sorted(names - set(data))}, "
            f"unexpected {sorted(set(data) - names)}"
        )
    return cls(**fixed, **data)


@dataclass
class SpikeMonitor:
    """Per-group running geometric mean of ``grad_norm`` and the spike check against it."""

    factor: float
    decay: float
    averages: dict[str, list[float]] = field(default_factory=dict)  # group -> [biased, count]

    def _reference(self, group: str) -> float | None:
        entry = self.averages.get(group)
        if not entry:
            return None
        biased, count = entry
        return biased / (1.0 - self.decay**count)

    def check(self, report: SensitivityReport) -> list[str]:
        """Spikes in ``report`` (does not change the state)."""
        out = []
        for g in report:
            ref = self._reference(g.group)
            n = g.grad_norm
            if ref is None or n is None or not (math.isfinite(n) and n > 0):
                continue
            if math.log(n) - ref > math.log(self.factor):
                out.append(
                    f"gradient-norm spike in group {g.group} (grad_norm {n:.4g} > "
                    f"{self.factor:g} x running average {exp_text(ref)})"
                )
        return out

    def update(self, report: SensitivityReport) -> None:
        """Feed every finite positive ``grad_norm``, winsorised at the spike threshold."""
        for g in report:
            n = g.grad_norm
            if n is None or not (math.isfinite(n) and n > 0):
                continue
            x = math.log(n)
            ref = self._reference(g.group)
            if ref is not None:
                x = min(x, ref + math.log(self.factor))
            biased, count = self.averages.get(g.group, [0.0, 0])
            self.averages[g.group] = [self.decay * biased + (1.0 - self.decay) * x, count + 1]

    def state_dict(self) -> dict[str, Any]:
        return {"averages": {k: list(v) for k, v in self.averages.items()}}

    def load_state_dict(self, state: Any) -> None:
        loaded = _from_dict(SpikeMonitor, state, factor=self.factor, decay=self.decay)
        if not isinstance(loaded.averages, dict):
            raise ValueError(f"spike averages must be a mapping, got {loaded.averages!r}")
        for k, v in loaded.averages.items():
            if not isinstance(k, str):
                raise ValueError(f"spike average group names must be strings, got {k!r}")
            ok = isinstance(v, list) and len(v) == 2
            ok = ok and isinstance(v[0], int | float) and not isinstance(v[0], bool)
            ok = ok and isinstance(v[1], int) and not isinstance(v[1], bool) and v[1] >= 1
            if not (ok and math.isfinite(v[0])):
                raise ValueError(f"spike average of group {k!r} must be [float, count>=1], got {v}")
        self.averages = {k: [float(v[0]), int(v[1])] for k, v in loaded.averages.items()}


@dataclass
class FallbackGate:
    """Phases ``"adapting"`` -> (trip) ``"cooldown"`` -> ``"recovering"`` -> ``"adapting"``."""

    cooldown: int
    hysteresis: int
    phase: str = "adapting"
    remaining: int = 0
    healthy: int = 0
    reason: str | None = None

    def trip(self, reason: str) -> None:
        self.reason = reason
        self.remaining = self.cooldown
        self.healthy = 0
        self.phase = "cooldown" if self.cooldown > 0 else "recovering"

    def advance(self) -> tuple[bool, str | None]:
        """Account for one healthy report: ``(adapt now?, event)``."""
        if self.phase == "adapting":
            return True, None
        if self.phase == "cooldown":
            self.remaining -= 1
            if self.remaining <= 0:
                self.phase = "recovering"
            return False, (
                f"fallback cooldown ({self.remaining} more recalibration(s)) after: {self.reason}"
            )
        self.healthy += 1
        if self.healthy >= self.hysteresis:
            self.phase = "adapting"
            return True, f"adaptation resumed after {self.healthy} consecutive healthy report(s)"
        return False, (
            f"fallback recovering ({self.healthy}/{self.hysteresis} consecutive healthy "
            f"reports) after: {self.reason}"
        )

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("cooldown", "hysteresis")}

    def load_state_dict(self, state: Any) -> None:
        g = _from_dict(FallbackGate, state, cooldown=self.cooldown, hysteresis=self.hysteresis)
        if g.phase not in ("adapting", "cooldown", "recovering"):
            raise ValueError(
                f"fallback phase must be adapting/cooldown/recovering, got {g.phase!r}"
            )
        for k in ("remaining", "healthy"):
            v = getattr(g, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"fallback {k} must be an int >= 0, got {v!r}")
        if g.reason is not None and not isinstance(g.reason, str):
            raise ValueError(f"fallback reason must be a string or None, got {g.reason!r}")
        self.phase, self.remaining, self.healthy, self.reason = (
            g.phase,
            g.remaining,
            g.healthy,
            g.reason,
        )


@dataclass
class ValidationWatch:
    """Worsening and collapse of a validation metric after adaptation was switched on."""

    mode: str
    patience: int
    min_delta: float
    collapse_drop: float = math.inf
    collapse_patience: int = 1
    best: float | None = None
    strikes: int = 0
    peak: float | None = None
    collapses: int = 0

    def _worse(self, value: float, than: float) -> bool:
        if self.mode == "min":
            return value > than + self.min_delta
        return value < than - self.min_delta

    def _decline(self, value: float) -> tuple[float, float]:
        """``(decline from the peak, scale)``: the decline in the metric's units (positive
        when worse) and ``max(|peak - best|, |peak|)``, the unit of ``collapse_drop``."""
        assert self.peak is not None and self.best is not None
        decline = self.peak - value if self.mode == "max" else value - self.peak
        return decline, max(abs(self.peak - self.best), abs(self.peak))

    def _collapsed(self, value: float) -> bool:
        if self.peak is None or self.best is None:
            return False
        decline, scale = self._decline(value)
        return decline > self.min_delta and decline > self.collapse_drop * scale

    def reset(self) -> None:
        """Forget the strikes and the peak (a fallback ends an episode of adaptation)."""
        self.strikes, self.collapses, self.peak = 0, 0, None

    def observe(self, value: float, *, adapting: bool) -> str | None:
        """Record ``value``; return a fallback reason when it trips (state is updated)."""
        if not adapting:
            self.reset()
            if math.isfinite(value) and (self.best is None or self._worse(self.best, value)):
                self.best = value
            return None
        if not math.isfinite(value):
            return f"validation metric not finite ({value!r}) while adapting"
        if self.best is None:
            self.best = self.peak = value
            return None
        self.strikes = self.strikes + 1 if self._worse(value, self.best) else 0
        collapsed = self._collapsed(value)
        self.collapses = self.collapses + 1 if collapsed else 0
        if collapsed:
            decline, scale = self._decline(value)
            collapse = (
                f"validation metric collapsed ({value:.6g} vs {self.peak:.6g}, the best while "
                f"adapting: a decline of {decline:.4g} > collapse_drop {self.collapse_drop:g} x "
                f"{scale:.4g}; mode {self.mode}) for {self.collapses} consecutive observation(s)"
            )
        if self.peak is None or (value > self.peak if self.mode == "max" else value < self.peak):
            self.peak = value
        if self.strikes >= self.patience:
            return (
                f"validation metric worsened ({value:.6g} vs best {self.best:.6g} before "
                f"adaptation, mode {self.mode}) for {self.strikes} consecutive observation(s)"
            )
        if self.collapses >= self.collapse_patience:
            return collapse
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "strikes": self.strikes,
            "peak": self.peak,
            "collapses": self.collapses,
        }

    def load_state_dict(self, state: Any) -> None:
        w = _from_dict(
            ValidationWatch,
            state,
            mode=self.mode,
            patience=self.patience,
            min_delta=self.min_delta,
            collapse_drop=self.collapse_drop,
            collapse_patience=self.collapse_patience,
        )
        for k in ("best", "peak"):
            v = getattr(w, k)
            if v is not None and not (isinstance(v, int | float) and math.isfinite(v)):
                raise ValueError(f"validation {k} must be a finite float or None, got {v!r}")
        for k in ("strikes", "collapses"):
            v = getattr(w, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"validation {k} must be an int >= 0, got {v!r}")
        self.best = None if w.best is None else float(w.best)
        self.peak = None if w.peak is None else float(w.peak)
        self.strikes, self.collapses = w.strikes, w.collapses
