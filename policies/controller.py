"""The sensitivity controller: a report in, one bounded multiplier per group out.

At each recalibration :meth:`SensitivityController.update` runs, in this order:

1. **Sanity checks** (:mod:`layerwise.policies.safety`): a non-finite or impossible estimate, or a
   gradient-norm spike, sends every multiplier to 1 at once (the fallback bypasses the change
   limit on purpose: 1 is the tuned recipe, and leaving a suspect multiplier in place for a few
   more recalibrations is what a fallback exists to avoid), then a cooldown and hysteresis.
2. **Measure and smooth**: the rule's inputs (positive quantities, see
:mod:`layerwise.policies.rules`)
   are smoothed per group and input by a bias-corrected EMA of their logs with its standard
   error (:class:`layerwise.policies.smoothing.LogEMA`, decay ``ema``; 0 disables smoothing). A
   measurement with a relative stderr above max(10, ``max_rel_stderr``) is not fed. Healthy
   reports feed the EMA during a fallback too; a fallback empties it.
3. **Confidence**: a group whose smoothed relative stderr exceeds ``max_rel_stderr`` (or that
   the rule cannot use) keeps its previous multiplier, and its reason says so.
4. **Rule and normalisation**: ``m_g = exp(alpha * (s_g - s_bar))`` over the other groups,
   with ``s_bar`` their ``num_params``-weighted mean score, so their parameter-weighted
   geometric mean is 1 (over all groups when none is held).
5. **Bounds** (:func:`layerwise.policies.bounds.apply_bounds`), the visible last step.

Defaults are conservative, for use over a well-tuned Adam recipe (Adam already divides by a
per-parameter gradient scale, so a full-strength rule would double-count): ``alpha=0.5``,
``max_spread=4`` (so every multiplier stays in [0.5, 2]), ``max_change=1.5``, ``ema=0.5``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from layerwise.policies.bounds import Bounds, apply_bounds
from layerwise.policies.rules import Rule, make_rule, normalise
from layerwise.policies.safety import FallbackGate, SpikeMonitor, ValidationWatch, report_problems
from layerwise.policies.smoothing import LogEMA
from layerwise.sensitivity import SensitivityReport

__all__ = ["Decision", "SensitivityController"]

_UNINFORMATIVE = 10.0  # relative stderr above which a measurement says nothing about its log
_VERSION = 1


@dataclass(frozen=True)
class Decision:
    """One recalibration's outcome: a multiplier and a reason per group, whether the
    controller is in its uniform fallback, and the event (``None`` on an ordinary update)."""

    step: int
    multipliers: dict[str, float]
    reasons: dict[str, str] = field(default_factory=dict)
    fallback: bool = False
    event: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "multipliers": dict(self.multipliers),
            "reasons": dict(self.reasons),
            "fallback": self.fallback,
            "event": self.event,
        }


def _real(name: str, value: Any, lo: float, hi: float, *, open_lo=False, open_hi=False) -> float:
    """``value`` as a float in the interval (``hi`` may be inf, then inf itself is allowed)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    above = v > lo if open_lo else v >= lo
    below = v < hi if open_hi else v <= hi
    if math.isnan(v) or not (above and below):
        span = f"{'(' if open_lo else '['}{lo:g}, {hi:g}{')' if open_hi else ']'}"
        raise ValueError(f"{name} must be in {span}, got {value!r}")
    return v


def _int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value!r}")
    return int(value)


class SensitivityController:
    """Bounded per-group learning-rate multipliers from sensitivity reports (module docstring).

    ``spike_factor`` and ``spike_ema``: a group's gradient norm above ``spike_factor`` times its
    running geometric mean (EMA decay ``spike_ema``) trips the fallback. ``cooldown``:
    recalibrations at all ones after a fallback; ``hysteresis``: consecutive healthy reports
    needed after it. ``mode``/``patience``/``min_delta``: the validation watch (see
    :class:`layerwise.policies.safety.ValidationWatch`).

    >>> from layerwise.sensitivity import GroupEstimate, SensitivityReport
    >>> report = SensitivityReport([GroupEstimate("a", 10, hessian_trace=40.0),
    ...                             GroupEstimate("b", 10, hessian_trace=10.0)])
    >>> SensitivityController().update(report, step=100).multipliers
    {'a': 0.7071067811865476, 'b': 1.414213562373095}
    """

    def __init__(
        self,
        rule: str | Rule | Iterable[str | Rule] = "curvature",
        *,
        alpha: float = 0.5,
        min_multiplier: float = 0.1,
        max_multiplier: float = 10.0,
        max_spread: float = 4.0,
        max_change: float = 1.5,
        ema: float = 0.5,
        max_rel_stderr: float = 0.5,
        spike_factor: float = 10.0,
        spike_ema: float = 0.9,
        cooldown: int = 2,
        hysteresis: int = 2,
        patience: int = 3,
        mode: str = "min",
        min_delta: float = 0.0,
    ) -> None:
        self.rule = make_rule(rule)
        self.alpha = _real("alpha", alpha, 0.0, math.inf, open_hi=True)
        self.bounds = Bounds(min_multiplier, max_multiplier, max_spread, max_change)
        self.ema = _real("ema", ema, 0.0, 1.0, open_hi=True)
        self.max_rel_stderr = _real("max_rel_stderr", max_rel_stderr, 0.0, math.inf, open_lo=True)
        spike_factor = _real("spike_factor", spike_factor, 1.0, math.inf, open_lo=True)
        spike_ema = _real("spike_ema", spike_ema, 0.0, 1.0, open_hi=True)
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        min_delta = _real("min_delta", min_delta, 0.0, math.inf, open_hi=True)
        self._spike = SpikeMonitor(spike_factor, spike_ema)
        self._gate = FallbackGate(_int("cooldown", cooldown, 0), _int("hysteresis", hysteresis, 1))
        self._watch = ValidationWatch(mode, _int("patience", patience, 1), min_delta)
        self._multipliers: dict[str, float] = {}
        self._smooth = LogEMA(self.ema)
        self._step: int | None = None
        self._updates = 0

    # -- public state ---------------------------------------------------------------------
    @property
    def multipliers(self) -> dict[str, float]:
        """Current multiplier of every group seen so far (``{}`` before the first update)."""
        return dict(self._multipliers)

    @property
    def adapting(self) -> bool:
        """Whether the last update adapted (not before the first update, not in fallback)."""
        return self._updates > 0 and self._gate.phase == "adapting"

    @property
    def settings(self) -> dict[str, Any]:
        """The constructor's arguments as plain data (the rule by its name)."""
        b = self.bounds
        return {
            "rule": self.rule.name,
            "alpha": self.alpha,
            "min_multiplier": b.min_multiplier,
            "max_multiplier": b.max_multiplier,
            "max_spread": b.max_spread,
            "max_change": b.max_change,
            "ema": self.ema,
            "max_rel_stderr": self.max_rel_stderr,
            "spike_factor": self._spike.factor,
            "spike_ema": self._spike.decay,
            "cooldown": self._gate.cooldown,
            "hysteresis": self._gate.hysteresis,
            "patience": self._watch.patience,
            "mode": self._watch.mode,
            "min_delta": self._watch.min_delta,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.settings.items())
        return f"SensitivityController({args})"

    # -- the update -----------------------------------------------------------------------
    def update(self, report: SensitivityReport, *, step: int) -> Decision:
        """Multipliers for the groups of ``report`` at training step ``step``."""
        if not isinstance(report, SensitivityReport):
            raise TypeError(f"report must be a SensitivityReport, got {type(report).__name__}")
        if len(report) == 0:
            raise ValueError("report must hold at least one group, got an empty report")
        step = _int("step", step, 0 if self._step is None else self._step)
        names = report.names
        problems = report_problems(report) + self._spike.check(report)
        self._spike.update(report)
        self._step, self._updates = step, self._updates + 1
        if problems:
            return self._fallback("; ".join(problems), step, names)
        adapt, event = self._gate.advance()
        limit = max(_UNINFORMATIVE, self.max_rel_stderr)
        smoothed = {
            group: inputs
            if isinstance(inputs, str)
            else self._smooth.feed(group, inputs, limit=limit)
            for group, inputs in self.rule.measure(report).items()
        }
        if not adapt:
            return self._uniform(step, names, event, event)
        return self._adapt(report, smoothed, step, event)

    def _adapt(self, report, smoothed, step: int, event: str | None) -> Decision:
        prev = {n: self._multipliers.get(n, 1.0) for n in report.names}
        scores, why = {}, {}
        for name in report.names:
            entry = smoothed.get(name, "the rule gave no measurement")
            if isinstance(entry, str):
                why[name] = f"held at {prev[name]:.4g}: {entry}"
                continue
            logs, rels = entry
            shaky = [f"{k} {r:.3g}" for k, r in rels.items() if not r <= self.max_rel_stderr]
            score = self.rule.score(logs)
            if shaky:
                why[name] = (
                    f"held at {prev[name]:.4g}: relative stderr of {', '.join(shaky)} > "
                    f"max_rel_stderr {self.max_rel_stderr:g}"
                )
            elif not math.isfinite(score):
                why[name] = f"held at {prev[name]:.4g}: rule score {score!r} is not finite"
            else:
                scores[name] = score
                inputs = ", ".join(f"{k} {math.exp(v):.4g}" for k, v in logs.items())
                why[name] = f"{self.rule.name}: {inputs or 'no inputs'}"
        weights = {g.group: float(g.num_params) for g in report if g.group in scores}
        proposed = {**prev, **normalise(scores, weights, self.alpha)}
        final, notes = apply_bounds(proposed, prev, self.bounds)
        reasons = {}
        for name in report.names:
            tail = f" -> proposed {proposed[name]:.4g}" if name in scores else ""
            extra = "".join(f"; {n}" for n in notes[name])
            reasons[name] = f"{why[name]}{tail}{extra} -> {final[name]:.4g}"
        self._multipliers.update(final)
        return Decision(step, final, reasons, False, event)

    def _uniform(self, step, names, event: str | None, why: str | None) -> Decision:
        self._multipliers = {k: 1.0 for k in [*self._multipliers, *names]}
        reasons = {n: why or "uniform" for n in names}
        return Decision(step, {n: 1.0 for n in names}, reasons, True, event)

    def _fallback(self, reason: str, step: int, names) -> Decision:
        self._gate.trip(reason)
        self._watch.strikes = 0
        self._smooth.reset()
        return self._uniform(step, names, f"fallback: {reason}", f"fallback: {reason}")

    # -- validation -----------------------------------------------------------------------
    def observe_validation(self, value: float, *, step: int | None = None) -> Decision | None:
        """Record a validation metric. Returns the fallback :class:`Decision` (all ones, for
        every group seen so far, effective at once) when it trips, else ``None``."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"value must be a real number, got {value!r}")
        if step is not None:
            step = _int("step", step, 0)
        reason = self._watch.observe(float(value), adapting=self.adapting)
        if reason is None:
            return None
        at = step if step is not None else (self._step or 0)
        return self._fallback(reason, at, list(self._multipliers))

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data (floats, ints, strings, lists, dicts, None)."""
        return {
            "version": _VERSION,
            "settings": self.settings,
            "step": self._step,
            "updates": self._updates,
            "multipliers": dict(self._multipliers),
            "smoothing": self._smooth.state_dict(),
            "spike": self._spike.state_dict(),
            "gate": self._gate.state_dict(),
            "validation": self._watch.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output. The settings must match this controller's; any
        mismatch or malformed entry is a ValueError that names it (and nothing is changed)."""
        step, updates, multipliers = _check_state(self, state)
        smooth = LogEMA(self.ema)
        smooth.load_state_dict(state["smoothing"])
        spike = SpikeMonitor(self._spike.factor, self._spike.decay)
        gate = FallbackGate(self._gate.cooldown, self._gate.hysteresis)
        watch = ValidationWatch(self._watch.mode, self._watch.patience, self._watch.min_delta)
        spike.load_state_dict(state["spike"])
        gate.load_state_dict(state["gate"])
        watch.load_state_dict(state["validation"])
        self._spike, self._gate, self._watch = spike, gate, watch
        self._step, self._updates, self._multipliers, self._smooth = (
            step,
            updates,
            multipliers,
            smooth,
        )


_KEYS = (
    "version",
    "settings",
    "step",
    "updates",
    "multipliers",
    "smoothing",
    "spike",
    "gate",
    "validation",
)


def _check_state(ctrl: SensitivityController, state: Any):
    """Validate the controller-level entries of a state dict; return them converted."""
    if not isinstance(state, Mapping):
        raise ValueError(f"state must be a mapping from state_dict(), got {type(state).__name__}")
    if set(state) != set(_KEYS):
        raise ValueError(
            f"state keys differ: missing {sorted(set(_KEYS) - set(state))}, "
            f"unexpected {sorted(set(state) - set(_KEYS))}"
        )
    if state["version"] != _VERSION:
        raise ValueError(f"state version must be {_VERSION}, got {state['version']!r}")
    ours, theirs = ctrl.settings, state["settings"]
    if not isinstance(theirs, Mapping):
        raise ValueError(f"state settings must be a mapping, got {theirs!r}")
    diff = [
        f"{k}: saved {theirs.get(k)!r}, here {ours.get(k)!r}"
        for k in sorted(set(ours) | set(theirs))
        if theirs.get(k) != ours.get(k)
    ]
    if diff:
        raise ValueError(f"state was saved with other settings ({'; '.join(diff)})")
    step, updates = state["step"], state["updates"]
    if step is not None:
        step = _int("state step", step, 0)
    updates = _int("state updates", updates, 0)
    lo, hi = ctrl.bounds.interval()
    multipliers = {}
    if not isinstance(state["multipliers"], Mapping):
        raise ValueError(f"state multipliers must be a mapping, got {state['multipliers']!r}")
    for name, v in state["multipliers"].items():
        if not (isinstance(name, str) and isinstance(v, int | float) and lo <= v <= hi):
            raise ValueError(
                f"state multiplier of group {name!r} must be a float in "
                f"[{lo:.4g}, {hi:.4g}] under these bounds, got {v!r}"
            )
        multipliers[name] = float(v)
    return step, updates, multipliers
