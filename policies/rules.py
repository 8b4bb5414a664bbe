"""Rules: how a :class:`~layerwise.sensitivity.SensitivityReport` becomes per-group log-preferences.

A rule works in two steps so that the controller can smooth and vet its inputs in between:

1. ``measure(report)`` -> ``{group: {input: Measurement(log_value, rel_stderr)} or reason}``:
   the positive quantities the rule reads, as natural logarithms, each with the relative
   standard error of the quantity (by the delta method, the standard error of its log; 0 when
   the report gives none, so the quantity is taken as exact). A group the rule cannot use gets a
   string that says why; the controller keeps that group's previous multiplier.
2. ``score(logs)`` -> the group's log-preference from its (smoothed) log inputs.

The controller turns scores ``s_g`` into multipliers with :func:`normalise`:
``m_g = exp(alpha * (s_g - s_bar))``, ``s_bar`` the parameter-weighted mean score, so the
parameter-weighted geometric mean of the multipliers is 1 and the base schedule keeps its
meaning. Every built-in rule is a power law in positive quantities, ``s_g = power * ±log q_g``:

``curvature``    q = max(c_g, floor), c_g = trace / num_params; s = -log q, so
                 ``m_g = (reference / q_g) ** alpha`` with the reference the weighted geometric
                 mean. For a quadratic the stable step is ∝ 1/curvature (alpha = 1, a block
                 Newton scaling); alpha = 1/2 is the square-root damping of adaptive methods.
                 Floor rule: curvature at or below ``floor_level = floor * (weighted mean of the
                 positive parts max(c, 0))`` is taken as ``floor_level``, so zero or negative
                 curvature (concave blocks, saddles) gets the largest proposal, never a blow-up.
                 The floor ignores negative values, which keeps the rule monotone (more
                 curvature never raises a group's multiplier). All curvatures <= 0: uniform.
                 ``floor = 0.01`` by default: a curvature under 1% of the mean is as good as
                 zero for a multiplier that the bounds hold to a factor of a few, and the
                 floor caps how far one such group can drag the reference of the others.
                 The trace is the group's block of the Hessian or of the generalised
                 Gauss-Newton matrix, by ``source``: ``"hessian"`` reads ``hessian_trace``
                 (input ``curvature``), ``"ggn"`` reads ``ggn_trace`` (input
                 ``ggn_curvature``; PSD, so never negative, and far less noisy where a
                 Hessian block's trace is a small remainder of cancelling terms), and
                 ``"auto"`` (the default) reads ``ggn_trace`` when the report has it
                 (any group measured it) and ``hessian_trace`` otherwise. Registered as
                 ``curvature`` (auto), ``curvature_ggn`` and ``curvature_hessian``.
``noise``        q = 1 + max(noise_to_signal, 0); s = -log q, so
                 ``m_g ∝ (1 / (1 + noise_to_signal_g)) ** alpha``. This is both the signal
                 fraction ``‖G‖² / (‖G‖² + tr Σ / B)`` of the expected squared mini-batch gradient
                 and the optimal-rate ratio ``eps_opt(B) / eps_max = 1 / (1 + B_noise / B)`` of
                 McCandlish et al. (2018, "An Empirical Model of Large-Batch Training", §2) with
                 the simple noise scale ``B_noise = tr Σ / ‖G‖²``: alpha = 1 is their rate.
                 Negative noise_to_signal (possible from unbiased two-batch estimates) is clipped
                 at 0; ``+inf`` (no signal detectable above the noise) is capped at ``NSR_CAP``,
                 which gives the group the smallest step the bounds allow. ``B`` is the batch of
                 the estimate: estimate with the training batch size.
``trust_ratio``  q = param_norm / grad_norm; s = +log q: LARS (You et al. 2017), exactly its
                 normalised ratio at alpha = 1. A zero norm leaves the ratio undefined (held).
``uniform``      no inputs, s = 0: all ones (the control arm).

Each rule declares ``quantities``, the estimate quantities it reads (beyond ``param_norm`` and
``num_params``, which every report holds): ``curvature`` and ``curvature_hessian``
``("hessian_trace",)`` (``"auto"`` reads ``ggn_trace`` too, when the estimate was also asked
for it, e.g. by ``layerwise analyze --quantities``; and ``curvature``'s
``quantities_for(loss_object=True)`` is ``("ggn_trace",)``, so an engine whose loss is a
loss object estimates the GGN trace instead of the Hessian's: :func:`rule_quantities`),
``curvature_ggn`` ``("ggn_trace",)`` (which needs a loss object,
:class:`layerwise.sensitivity.CrossEntropy`), ``noise`` ``("grad_norm", "grad_variance")``
(``grad_variance`` brings ``noise_to_signal``; ``grad_norm`` its standard error),
``trust_ratio`` ``("grad_norm",)``, ``uniform`` ``()``; a composition the union. The engine
estimates exactly those (plus ``grad_norm`` for the controller's spike check).

Composition (``"curvature+noise"`` or a list) sums the scores, i.e. multiplies the multipliers,
then renormalises. Rules are frozen dataclasses; ``RULES`` maps names to zero-argument factories,
so adding an entry enrols the rule in the contract tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, NamedTuple, Protocol, runtime_checkable

from layerwise.sensitivity import KNOWN_QUANTITIES, QUANTITIES, GroupEstimate, SensitivityReport

__all__ = [
    "CURVATURE_SOURCES",
    "RULES",
    "CompositeRule",
    "CurvatureRule",
    "Measurement",
    "NoiseRule",
    "Rule",
    "TrustRatioRule",
    "UniformRule",
    "make_rule",
    "normalise",
    "rule_quantities",
]

#: Log-multipliers are clipped to this magnitude before ``exp`` (far beyond any bound).
LOG_CLIP = 700.0


class Measurement(NamedTuple):
    """A positive quantity as ``log_value`` with its relative standard error (>= 0, may be inf)."""

    log_value: float
    rel_stderr: float


Measured = dict[str, dict[str, Measurement] | str]


@runtime_checkable
class Rule(Protocol):
    """What the controller needs of a rule (see the module docstring). A rule should also
    declare ``quantities``, the names of :func:`layerwise.sensitivity.estimate` quantities it
    reads (``param_norm`` and ``num_params`` are always there); a rule without it is given
    every quantity by the engine."""

    name: str

    def measure(self, report: SensitivityReport) -> Measured: ...

    def score(self, logs: Mapping[str, float]) -> float: ...


def _rel(stderr: float | None, value: float) -> float:
    """Relative standard error ``stderr / |value|``: 0 when no (or zero) stderr is given."""
    if stderr is None or stderr == 0:
        return 0.0
    if not math.isfinite(stderr) or value == 0:
        return math.inf
    return abs(stderr) / abs(value)


def _check_power(power: float) -> None:
    if isinstance(power, bool) or not isinstance(power, int | float):
        raise TypeError(f"power must be a real number, got {power!r}")
    if not (math.isfinite(power) and power >= 0):
        raise ValueError(f"power must be finite and >= 0, got {power!r}")


def _log_weighted_mean(logs: Sequence[float], weights: Sequence[float]) -> float:
    """log of sum_i w_i exp(logs_i) / sum_i w_i, overflow-free (logs may hold -inf)."""
    total = math.fsum(weights)
    top = max(logs)
    if top == -math.inf or total <= 0:
        return -math.inf
    acc = math.fsum(w * math.exp(x - top) for x, w in zip(logs, weights, strict=True))
    return top + math.log(acc / total) if acc > 0 else -math.inf


def _weights(groups: Sequence[GroupEstimate]) -> list[float]:
    """Parameter counts; all ones when every count is 0 (equal weights)."""
    w = [float(g.num_params) for g in groups]
    return w if any(w) else [1.0] * len(w)


#: Where the curvature rule reads its trace: the report's GGN trace when it has one, the GGN
#: trace, or the Hessian trace.
CURVATURE_SOURCES = ("auto", "ggn", "hessian")
#: Per source: the trace read, the rule's input name, and its registered name.
_SOURCES = {
    "hessian": ("hessian_trace", "curvature", "curvature_hessian"),
    "ggn": ("ggn_trace", "ggn_curvature", "curvature_ggn"),
}


@dataclass(frozen=True)
class CurvatureRule:
    """Smaller steps where the per-parameter trace of the group's block of the Hessian or
    the Gauss-Newton matrix is larger, by ``source`` (module docstring)."""

    power: float = 1.0
    floor: float = 0.01
    source: str = "auto"
    name: str | None = None  # default: curvature (auto), curvature_ggn, curvature_hessian

    def __post_init__(self) -> None:
        _check_power(self.power)
        if not (isinstance(self.floor, int | float) and 0 < self.floor <= 1):
            raise ValueError(f"floor must be in (0, 1], got {self.floor!r}")
        if self.source not in CURVATURE_SOURCES:
            raise ValueError(f"source must be one of {CURVATURE_SOURCES}, got {self.source!r}")
        if self.name is None:
            default = "curvature" if self.source == "auto" else _SOURCES[self.source][2]
            object.__setattr__(self, "name", default)

    @property
    def quantities(self) -> tuple[str, ...]:
        """``("ggn_trace",)`` for source ``"ggn"``, else ``("hessian_trace",)``."""
        return ("ggn_trace",) if self.source == "ggn" else ("hessian_trace",)

    def quantities_for(self, loss_object: bool) -> tuple[str, ...]:
        """The trace to estimate for this rule given the loss: source ``"auto"`` asks for
        ``ggn_trace`` when the loss is a loss object (which gives it), else
        ``hessian_trace``; the other sources ask for their own whatever the loss."""
        if self.source == "auto" and loss_object:
            return ("ggn_trace",)
        return self.quantities

    def source_of(self, report: SensitivityReport) -> str:
        """The source read from ``report``: ``"auto"`` is ``"ggn"`` when any group has a
        ``ggn_trace``, else ``"hessian"``."""
        if self.source != "auto":
            return self.source
        return "ggn" if any(g.ggn_trace is not None for g in report) else "hessian"

    def measure(self, report: SensitivityReport) -> Measured:
        field, key, _ = _SOURCES[self.source_of(report)]
        traces = {g.group: getattr(g, field) for g in report}
        usable = [
            g
            for g in report
            if traces[g.group] is not None and g.num_params > 0 and math.isfinite(traces[g.group])
        ]
        per_param = {g.group: traces[g.group] / g.num_params for g in usable}
        logs = {n: math.log(c) if c > 0 else -math.inf for n, c in per_param.items()}
        level = _log_weighted_mean(list(logs.values()), _weights(usable)) if usable else -math.inf
        log_floor = math.log(self.floor) + level if level > -math.inf else 0.0
        out: Measured = {}
        for g in report:
            if g.group not in logs:
                out[g.group] = f"no finite {field} (or no parameters) in the report"
                continue
            rel = _rel(getattr(g, field + "_stderr"), traces[g.group])
            out[g.group] = {key: Measurement(max(logs[g.group], log_floor), rel)}
        return out

    def score(self, logs: Mapping[str, float]) -> float:
        key = "ggn_curvature" if "ggn_curvature" in logs else "curvature"
        return -self.power * logs[key]


@dataclass(frozen=True)
class NoiseRule:
    """Smaller steps where the gradient is mostly noise: q = 1 + noise_to_signal."""

    quantities: ClassVar[tuple[str, ...]] = ("grad_norm", "grad_variance")
    power: float = 1.0
    name: str = "noise"

    def __post_init__(self) -> None:
        _check_power(self.power)

    def measure(self, report: SensitivityReport) -> Measured:
        out: Measured = {}
        for g in report:
            nsr = g.noise_to_signal
            if nsr is None or math.isnan(nsr) or nsr == -math.inf:
                out[g.group] = "no usable noise_to_signal in the report"
                continue
            nsr = min(max(nsr, 0.0), NSR_CAP)
            # delta method: rel(nsr)^2 = rel(variance)^2 + (2 rel(grad_norm))^2
            rel_v = _rel(g.grad_variance_stderr, g.grad_variance or 0.0)
            rel_g = _rel(g.grad_norm_stderr, g.grad_norm or 0.0)
            rel_nsr = math.hypot(rel_v, 2.0 * rel_g)
            rel = 0.0 if nsr == 0 else (nsr / (1.0 + nsr)) * rel_nsr
            out[g.group] = {"noise_factor": Measurement(math.log1p(nsr), rel)}
        return out

    def score(self, logs: Mapping[str, float]) -> float:
        return -self.power * logs["noise_factor"]


@dataclass(frozen=True)
class TrustRatioRule:
    """LARS: larger steps where the weights are large relative to their gradient."""

    quantities: ClassVar[tuple[str, ...]] = ("grad_norm",)
    power: float = 1.0
    name: str = "trust_ratio"

    def __post_init__(self) -> None:
        _check_power(self.power)

    def measure(self, report: SensitivityReport) -> Measured:
        out: Measured = {}
        for g in report:
            p, n = g.param_norm, g.grad_norm
            if p is None or n is None or not (math.isfinite(p) and math.isfinite(n)):
                out[g.group] = "no finite param_norm and grad_norm in the report"
            elif p <= 0 or n <= 0:
                out[g.group] = f"trust ratio undefined (param_norm {p:.4g}, grad_norm {n:.4g})"
            else:
                rel = _rel(g.grad_norm_stderr, n)  # param_norm is exact
                out[g.group] = {"trust_ratio": Measurement(math.log(p) - math.log(n), rel)}
        return out

    def score(self, logs: Mapping[str, float]) -> float:
        return self.power * logs["trust_ratio"]


@dataclass(frozen=True)
class UniformRule:
    """All ones: no inputs, every score 0."""

    quantities: ClassVar[tuple[str, ...]] = ()
    name: str = "uniform"

    def measure(self, report: SensitivityReport) -> Measured:
        return {g.group: {} for g in report}

    def score(self, logs: Mapping[str, float]) -> float:
        return 0.0


@dataclass(frozen=True)
class CompositeRule:
    """The sum of its parts' scores (the product of their multipliers)."""

    parts: tuple[Rule, ...]

    def __post_init__(self) -> None:
        names = [p.name for p in self.parts]
        if len(names) < 1 or len(set(names)) != len(names):
            raise ValueError(f"rule parts must be at least one, without repeats, got {names}")

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.parts)

    @property
    def quantities(self) -> tuple[str, ...]:
        """The union of the parts' quantities (:data:`layerwise.sensitivity.QUANTITIES`, those
        any loss function gives, for a part that declares none)."""
        wanted = set()
        for part in self.parts:
            wanted.update(getattr(part, "quantities", QUANTITIES))
        return tuple(q for q in KNOWN_QUANTITIES if q in wanted)

    def quantities_for(self, loss_object: bool) -> tuple[str, ...]:
        """The union of the parts' :func:`rule_quantities` for this loss."""
        wanted = set()
        for part in self.parts:
            wanted.update(rule_quantities(part, loss_object) or QUANTITIES)
        return tuple(q for q in KNOWN_QUANTITIES if q in wanted)

    def measure(self, report: SensitivityReport) -> Measured:
        merged: Measured = {g.group: {} for g in report}
        for part in self.parts:
            for group, got in part.measure(report).items():
                have = merged[group]
                if isinstance(have, str):
                    continue
                if isinstance(got, str):
                    merged[group] = f"{part.name}: {got}"
                else:
                    clash = sorted(set(have) & set(got))
                    if clash:
                        raise ValueError(f"rule parts share input names {clash}")
                    have.update(got)
        return merged

    def score(self, logs: Mapping[str, float]) -> float:
        return math.fsum(p.score(logs) for p in self.parts)


def rule_quantities(rule: object, loss_object: bool) -> tuple[str, ...] | None:
    """The estimate quantities ``rule`` reads, given whether the loss is a loss object
    (:class:`layerwise.sensitivity.CrossEntropy`, ...): its ``quantities_for(loss_object)``
    when it has one (``curvature``'s ``"auto"`` source reads ``ggn_trace`` from a loss
    object, ``hessian_trace`` otherwise), else its ``quantities``; ``None`` when it
    declares none.

    >>> rule = make_rule("curvature")
    >>> rule_quantities(rule, True), rule_quantities(rule, False)
    (('ggn_trace',), ('hessian_trace',))
    """
    pick = getattr(rule, "quantities_for", None)
    if callable(pick):
        return tuple(pick(loss_object))
    declared = getattr(rule, "quantities", None)
    return None if declared is None else declared


#: Registry of rules by name: zero-argument factories.
RULES: dict[str, Callable[[], Rule]] = {
    "curvature": CurvatureRule,
    "curvature_ggn": lambda: CurvatureRule(source="ggn"),
    "curvature_hessian": lambda: CurvatureRule(source="hessian"),
    "noise": NoiseRule,
    "trust_ratio": TrustRatioRule,
    "uniform": UniformRule,
}


def _one(spec: str | Rule) -> Rule:
    if isinstance(spec, str):
        if spec not in RULES:
            raise ValueError(f"unknown rule {spec!r}; known rules are {sorted(RULES)}")
        return RULES[spec]()
    if isinstance(spec, Rule):
        return spec
    raise TypeError(f"rule must be a name, a Rule or a list of them, got {type(spec).__name__}")


def make_rule(spec: str | Rule | Iterable[str | Rule]) -> Rule:
    """A rule from a name (``"curvature"``), a composition (``"curvature+noise"`` or a list),
    or a rule object.

    >>> make_rule("curvature+noise").name
    'curvature+noise'
    """
    if isinstance(spec, str):
        parts = [s.strip() for s in spec.split("+")]
    elif isinstance(spec, Rule):
        return spec
    elif isinstance(spec, Iterable):
        parts = list(spec)
    else:
        raise TypeError(f"rule must be a name, a Rule or a list of them, got {spec!r}")
    rules = [_one(p) for p in parts]
    if not rules:
        raise ValueError(f"rule must name at least one rule, got {spec!r}")
    return rules[0] if len(rules) == 1 else CompositeRule(tuple(rules))


#: Largest noise_to_signal the noise rule uses; ``+inf`` (no detectable signal) maps here.
NSR_CAP = 1e6


def normalise(
    scores: Mapping[str, float], weights: Mapping[str, float], alpha: float = 1.0
) -> dict[str, float]:
    """``exp(alpha * (s_g - s_bar))`` with ``s_bar = sum_g w_g s_g / sum_g w_g``: multipliers whose
    ``weights``-weighted geometric mean is 1 (equal weights when all are 0). Log-multipliers are
    clipped to ±``LOG_CLIP`` so that ``exp`` never overflows.

    >>> normalise({"a": 0.0, "b": math.log(4.0)}, {"a": 1, "b": 1})
    {'a': 0.5, 'b': 2.0}
    """
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be finite and >= 0, got {alpha!r}")
    names = list(scores)
    if not names:
        return {}
    w = [float(weights[n]) for n in names]
    if any(not (math.isfinite(x) and x >= 0) for x in w):
        raise ValueError(f"weights must be finite and >= 0, got {dict(weights)}")
    if not any(w):
        w = [1.0] * len(w)
    s = [float(scores[n]) for n in names]
    if any(not math.isfinite(x) for x in s):
        raise ValueError(f"scores must be finite, got {dict(scores)}")
    mean = math.fsum(wi * si for wi, si in zip(w, s, strict=True)) / math.fsum(w)
    out = {}
    for n, si in zip(names, s, strict=True):
        x = alpha * (si - mean)
        out[n] = math.exp(min(max(x, -LOG_CLIP), LOG_CLIP)) if alpha else 1.0
    return out
