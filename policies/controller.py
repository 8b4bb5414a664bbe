"""The sensitivity controller: a report in, one bounded multiplier per group out.

At each recalibration :meth:`SensitivityController.update` runs, in this order:

1. **Sanity checks** (:mod:`layerwise.policies.safety`, configured by ``safety``, a
   :class:`layerwise.policies.Safety`): a non-finite or impossible estimate, or a
   gradient-norm spike, sends every multiplier to 1 at once (the fallback bypasses the change
   limit on purpose: 1 is the tuned recipe, and leaving a suspect multiplier in place for a few
   more recalibrations is what a fallback exists to avoid), then a cooldown and hysteresis.
2. **Measure and smooth**: the rule's inputs (positive quantities, see
   :mod:`layerwise.policies.rules`) are smoothed per group and input by a bias-corrected EMA
   of their logs with its standard error (:class:`layerwise.policies.smoothing.LogEMA`, decay
   ``ema``; 0 disables smoothing). A measurement with a relative stderr above max(10,
   ``max_rel_stderr``) is not fed. Healthy reports feed the EMA during a fallback too; a
   fallback empties it.
3. **Confidence**: a group whose smoothed relative stderr exceeds ``max_rel_stderr`` (or that
   the rule cannot use) keeps its previous multiplier, and its reason says so.
4. **Rule and normalisation**: ``m_g = exp(alpha * (s_g - s_bar))`` over the other groups,
   with ``s_bar`` their ``num_params``-weighted mean score, so their parameter-weighted
   geometric mean is 1 (over all groups when none is held).
5. **Bounds** (:func:`layerwise.policies.bounds.apply_bounds` with ``bounds``, a
   :class:`layerwise.policies.Bounds`), the visible last step.

Two more ways into the fallback, between recalibrations:

* **The validation watch** (:meth:`SensitivityController.observe_validation`, the metric's
  direction ``Safety.mode``). While adapting, a value is compared with two references.
  (a) ``best``, the best value seen while not adapting: ``patience`` consecutive values
  worse by more than ``min_delta`` trip the fallback. (b) ``peak``, the best value seen
  while adapting since adaptation (re)started: a value whose decline from the peak exceeds
  ``min_delta`` and ``collapse_drop * max(|peak - best|, |peak|)`` is a collapse, and
  ``collapse_patience`` consecutive collapses trip the fallback. (b) catches a run that
  learned under adaptation and then broke down while still "better than before" (0.07
  before adapting, then 0.90, 0.955, 0.50, 0.083: the two values 0.083 trip it with the
  defaults ``collapse_drop=0.5``, ``collapse_patience=2``); the slow decline of overfitting
  (0.91 to 0.898) is a few percent of the scale and does not. A non-finite value while
  adapting trips at once.
* **An outside reason** (:meth:`SensitivityController.fall_back`), e.g. the engine's
  non-finite gradients.

Every entry point is transactional: it works on a copy of the state and commits it at the
end, so an exception leaves the controller as it was. On finite input ``update`` never
raises: reason texts write ``exp`` of a log without overflowing
(:func:`layerwise.policies.checks.exp_text`), and an arithmetic error nothing foresaw
becomes a fallback that names it.

Defaults are conservative, for use over a well-tuned Adam recipe (Adam already divides by a
per-parameter gradient scale, so a full-strength rule would double-count): ``alpha=0.5``,
``Bounds(max_spread=4)`` (so every multiplier stays in [0.5, 2]), ``Bounds(max_change=1.5)``,
``ema=0.5``. The state (:meth:`SensitivityController.state_dict`) is plain data and its
controller-level entries are checked by :mod:`layerwise.policies.controller_state`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from layerwise.policies.bounds import Bounds, apply_bounds
from layerwise.policies.checks import exp_text, int_at_least, real_in
from layerwise.policies.controller_config import controller_arguments
from layerwise.policies.controller_state import VERSION, check_state
from layerwise.policies.rules import Rule, make_rule, normalise
from layerwise.policies.safety import report_problems
from layerwise.policies.safety_settings import Safety
from layerwise.policies.smoothing import LogEMA
from layerwise.sensitivity import SensitivityReport

__all__ = ["Decision", "SensitivityController"]

#: The default limits and safety settings (frozen, so one shared default is safe).
DEFAULT_BOUNDS = Bounds()
DEFAULT_SAFETY = Safety()
_UNINFORMATIVE = 10.0  # relative stderr above which a measurement says nothing about its log


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


class SensitivityController:
    """Bounded per-group learning-rate multipliers from sensitivity reports (module docstring).

    ``rule``: a name (``"curvature"``), a composition (``"curvature+noise"`` or a list) or a
    :class:`layerwise.policies.Rule`. ``alpha`` >= 0: the exponent of the normalisation
    ``m_g = exp(alpha * (s_g - s_bar))``. ``ema`` in [0, 1): the decay of the smoothing of the
    rule's inputs (0: none). ``max_rel_stderr`` > 0 (may be inf): the largest smoothed relative
    standard error (dimensionless) a group may have and still move. ``bounds``
    (:class:`layerwise.policies.Bounds`): the limits on the multipliers. ``safety``
    (:class:`layerwise.policies.Safety`): the spike check, the fallback's cooldown and
    hysteresis, and the validation watch. :meth:`from_dict` builds one from plain data with
    the flat keys of configs (``{"alpha": 0.5, "max_spread": 4}``) or the nested form of
    :meth:`to_dict`.

    >>> from layerwise.sensitivity import GroupEstimate, SensitivityReport
    >>> report = SensitivityReport([GroupEstimate("a", 10, hessian_trace=40.0),
    ...                             GroupEstimate("b", 10, hessian_trace=10.0)])
    >>> SensitivityController().update(report, step=100).multipliers
    {'a': 0.7071067811865476, 'b': 1.414213562373095}
    >>> SensitivityController.from_dict({"rule": "noise", "max_spread": 2}).bounds.max_spread
    2.0
    """

    def __init__(
        self,
        rule: str | Rule | Iterable[str | Rule] = "curvature",
        *,
        alpha: float = 0.5,
        ema: float = 0.5,
        max_rel_stderr: float = 0.5,
        bounds: Bounds = DEFAULT_BOUNDS,
        safety: Safety = DEFAULT_SAFETY,
    ) -> None:
        self.rule = make_rule(rule)
        self.alpha = real_in("alpha", alpha, 0.0, math.inf, open_hi=True)
        self.ema = real_in("ema", ema, 0.0, 1.0, open_hi=True)
        self.max_rel_stderr = real_in("max_rel_stderr", max_rel_stderr, 0.0, math.inf, open_lo=True)
        if not isinstance(bounds, Bounds):
            raise TypeError(f"bounds must be a policies.Bounds, got {bounds!r}")
        if not isinstance(safety, Safety):
            raise TypeError(f"safety must be a policies.Safety, got {safety!r}")
        self.bounds, self.safety = bounds, safety
        self._spike = safety.spike_monitor()
        self._gate = safety.fallback_gate()
        self._watch = safety.validation_watch()
        self._multipliers: dict[str, float] = {}
        self._smooth = LogEMA(self.ema)
        self._step: int | None = None
        self._updates = 0

    # -- settings as plain data -----------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityController:
        """A controller from plain data: ``rule``, ``alpha``, ``ema``, ``max_rel_stderr`` and
        the fields of :class:`~layerwise.policies.Bounds` and :class:`~layerwise.policies.Safety`,
        flat or nested under ``bounds``/``safety`` (:mod:`layerwise.policies.controller_config`).
        Unknown keys are a ``ValueError`` that names them. The rule is rebuilt from its name,
        so a custom rule object must be passed to the constructor instead."""
        return cls(**controller_arguments(data))

    def to_dict(self) -> dict[str, Any]:
        """The settings, nested as the constructor takes them (the rule by its name);
        :meth:`from_dict` inverts it. :attr:`settings` is the same data flat."""
        return {
            "rule": self.rule.name,
            "alpha": self.alpha,
            "ema": self.ema,
            "max_rel_stderr": self.max_rel_stderr,
            "bounds": dataclasses.asdict(self.bounds),
            "safety": self.safety.to_dict(),
        }

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
        """The settings flat, one key per field (the keys of configs and manifests):
        ``rule`` (by name), ``alpha``, the fields of :attr:`bounds`, ``ema``,
        ``max_rel_stderr``, the fields of :attr:`safety`."""
        return {
            "rule": self.rule.name,
            "alpha": self.alpha,
            **dataclasses.asdict(self.bounds),
            "ema": self.ema,
            "max_rel_stderr": self.max_rel_stderr,
            **self.safety.to_dict(),
        }

    def __repr__(self) -> str:
        return (
            f"SensitivityController({self.rule.name!r}, alpha={self.alpha!r}, ema={self.ema!r}, "
            f"max_rel_stderr={self.max_rel_stderr!r}, bounds={self.bounds!r}, "
            f"safety={self.safety!r})"
        )

    # -- the update -----------------------------------------------------------------------
    def update(self, report: SensitivityReport, *, step: int) -> Decision:
        """Multipliers for the groups of ``report`` at training step ``step``.

        Transactional: the update runs on a copy of the state, committed when it is done, so
        an exception leaves the controller exactly as it was. On finite input it never
        raises: an arithmetic error (overflow) the checks did not foresee becomes a fallback
        whose reason names it, made from the state as it was before this update."""
        if not isinstance(report, SensitivityReport):
            raise TypeError(f"report must be a SensitivityReport, got {type(report).__name__}")
        if len(report) == 0:
            raise ValueError("report must hold at least one group, got an empty report")
        step = int_at_least("step", step, 0 if self._step is None else self._step)
        work = self._copy()
        try:
            decision = work._update(report, step)
        except ArithmeticError as err:
            work = self._copy()
            work._step, work._updates = step, work._updates + 1
            why = f"arithmetic error in the update ({type(err).__name__}: {err})"
            decision = work._fallback(why, step, report.names)
        self.__dict__.update(work.__dict__)
        return decision

    def fall_back(self, reason: str, *, step: int) -> Decision:
        """Fall back to the uniform rate now, for ``reason`` (a non-empty string, e.g. the
        engine's "non-finite gradients"), as an unhealthy report would: every group seen so
        far at 1, then the cooldown and hysteresis. Returns the fallback :class:`Decision`."""
        if not isinstance(reason, str) or not reason:
            raise TypeError(f"reason must be a non-empty string, got {reason!r}")
        step = int_at_least("step", step, 0)
        work = self._copy()
        decision = work._fallback(reason, step, list(work._multipliers))
        self.__dict__.update(work.__dict__)
        return decision

    def _copy(self) -> SensitivityController:
        """A copy whose mutable state is its own (settings and rule are shared: frozen)."""
        work = copy.copy(self)
        work._spike, work._gate, work._watch, work._smooth = copy.deepcopy(
            (self._spike, self._gate, self._watch, self._smooth)
        )
        work._multipliers = dict(self._multipliers)
        return work

    def _update(self, report: SensitivityReport, step: int) -> Decision:
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
                inputs = ", ".join(f"{k} {exp_text(v)}" for k, v in logs.items())
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
        self._watch.reset()
        self._smooth.reset()
        return self._uniform(step, names, f"fallback: {reason}", f"fallback: {reason}")

    # -- validation -----------------------------------------------------------------------
    def observe_validation(self, value: float, *, step: int | None = None) -> Decision | None:
        """Record a validation metric. Returns the fallback :class:`Decision` (all ones, for
        every group seen so far, effective at once) when it trips, else ``None``. The value
        is watched against the best before adaptation and against the best while adapting
        (:class:`~layerwise.policies.safety.ValidationWatch`)."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"value must be a real number, got {value!r}")
        if step is not None:
            step = int_at_least("step", step, 0)
        work = self._copy()
        reason = work._watch.observe(float(value), adapting=self.adapting)
        decision = None
        if reason is not None:
            at = step if step is not None else (self._step or 0)
            decision = work._fallback(reason, at, list(work._multipliers))
        self.__dict__.update(work.__dict__)
        return decision

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data (floats, ints, strings, lists, dicts, None)."""
        return {
            "version": VERSION,
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
        step, updates, multipliers = check_state(state, self.settings, self.bounds)
        smooth = LogEMA(self.ema)
        smooth.load_state_dict(state["smoothing"])
        spike = self.safety.spike_monitor()
        gate = self.safety.fallback_gate()
        watch = self.safety.validation_watch()
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
