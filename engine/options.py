"""The engine's options: the controller, the estimator's options, and what a rule reads.

Quantities default to what the controller's rule reads for the engine's loss
(:func:`layerwise.policies.rules.rule_quantities`), always with ``grad_norm`` (the
controller's spike check reads it), and every quantity for a controller whose rule declares
none. The default rule, ``curvature`` (source ``"auto"``), reads the Gauss-Newton trace
``ggn_trace`` when ``loss_fn`` is a loss object (:class:`layerwise.sensitivity.CrossEntropy`,
:class:`~layerwise.sensitivity.MeanSquaredError`): positive semi-definite, 2-15x more
accurate per group than a Hutchinson Hessian trace (issue 12), and cheaper. A plain
callable gives no GGN, so it keeps ``hessian_trace``; ``curvature_hessian`` reads the Hessian
trace whatever the loss.

Label samples: :data:`DEFAULT_GGN_SAMPLES` = 1 sampled label set per recalibration for
``ggn_trace``. One is enough: its standard error comes from the spread of the per-example
terms (√B·s/M, calibrated over seeds in the estimator's tests), and ``grad_norm`` shares the
GGN's forward pass, so a recalibration is one forward pass and two backward passes. More
samples lower the label noise, not the batch's sampling noise, which the controller's
smoothing pools across recalibrations anyway. Measured by
``python -m layerwise.experiments.benchmarks.engine`` (see its output and the README for
the figures): one sample against two, and against 4 Hutchinson probes of the Hessian trace.
Where the sampled terms are not per example (BatchNorm in training mode, or after the
estimator fell back to the batch function) one label set gives no standard error, so the
default there is :data:`DEFAULT_GGN_SAMPLES_BATCH_STATISTICS` = 2 (decided at each
recalibration, :func:`ggn_samples_for`); an explicit ``ggn_samples`` is always kept.

Probes: :data:`DEFAULT_PROBES` = 4 Hutchinson probes per recalibration (the Hessian path).
With the default interval (100 steps) a recalibration then costs about 7% of training time
on the small CNN of that benchmark (8 probes cost about 15-20% there); the controller's
smoothing pools the probes of successive recalibrations.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from layerwise.policies.rules import rule_quantities
from layerwise.sensitivity import KNOWN_QUANTITIES, QUANTITIES, EstimateOptions, OutputLoss

__all__ = [
    "DEFAULT_GGN_SAMPLES",
    "DEFAULT_GGN_SAMPLES_BATCH_STATISTICS",
    "DEFAULT_PROBES",
    "EstimatorSetup",
    "estimator_options",
    "make_controller",
    "required_quantities",
    "samples_behind",
]

#: Hutchinson probes per recalibration unless ``estimator={"probes": ...}`` says otherwise
#: (see the module docstring for why 4).
DEFAULT_PROBES = 4
#: Sampled label sets per recalibration for ``ggn_trace`` (``ggn="mc"``) unless
#: ``estimator={"ggn_samples": ...}`` says otherwise (see the module docstring for why 1).
DEFAULT_GGN_SAMPLES = 1
#: The same where the sampled terms are not per example (BatchNorm in training mode, or the
#: estimator fell back to the batch function): one label set gives no standard error there
#: (it would be NaN, and the controller's confidence gate would hold every group), two do.
DEFAULT_GGN_SAMPLES_BATCH_STATISTICS = 2
#: Arguments of :func:`layerwise.sensitivity.estimate` that the engine sets itself.
OWNED = ("groups", "generator", "seed")
#: Runtime arguments of :func:`layerwise.sensitivity.estimate` (callables, not settings) that
#: an ``estimator`` dict may carry; they are passed through as they are.
RUNTIME = ("batch_size", "progress")


class EstimatorSetup(NamedTuple):
    """The settings of every recalibration's estimate, and its runtime keyword arguments;
    ``ggn_samples_default``: the user left ``ggn_samples`` to the engine, which then raises it
    to :data:`DEFAULT_GGN_SAMPLES_BATCH_STATISTICS` where one label set gives no standard
    error (:func:`ggn_samples_for`)."""

    options: EstimateOptions
    runtime: dict[str, Any]
    ggn_samples_default: bool = False


def required_quantities(controller: Any, loss_fn: Any = None) -> tuple[str, ...]:
    """The report quantities the controller reads, given the loss: its rule's quantities
    (:func:`layerwise.policies.rules.rule_quantities`: the default ``curvature`` rule reads
    ``ggn_trace`` when ``loss_fn`` is a loss object such as
    :class:`layerwise.sensitivity.CrossEntropy`, ``hessian_trace`` for a plain callable) and
    ``grad_norm``, in the estimator's order; when the rule declares none, all those any loss
    function gives (:data:`layerwise.sensitivity.QUANTITIES`: not ``ggn_trace``, which needs
    a loss object and is estimated only for a rule that reads it)."""
    rule = getattr(controller, "rule", None)
    declared = rule_quantities(rule, isinstance(loss_fn, OutputLoss))
    if declared is None:
        return QUANTITIES
    if isinstance(declared, str) or not all(q in KNOWN_QUANTITIES for q in declared):
        raise ValueError(
            f"controller rule declares quantities {declared!r}; expected a tuple of some of "
            f"{KNOWN_QUANTITIES}"
        )
    wanted = {*declared, "grad_norm"}
    return tuple(q for q in KNOWN_QUANTITIES if q in wanted)


def make_controller(controller: Any) -> Any:
    """A rule name builds a :class:`layerwise.policies.SensitivityController`; any object with
    ``update``, ``state_dict`` and ``load_state_dict`` is taken as it is."""
    if isinstance(controller, str):
        from layerwise.policies import SensitivityController

        return SensitivityController(controller)
    needed = ("update", "state_dict", "load_state_dict")
    if not all(callable(getattr(controller, m, None)) for m in needed):
        raise TypeError(
            "controller must be a policies.SensitivityController (or a rule name such as "
            "'curvature', or an object with update(report, step=...), state_dict() and "
            f"load_state_dict()), got {controller!r} ({type(controller).__name__})"
        )
    return controller


def estimator_options(estimator: Any, controller: Any, loss_fn: Any = None) -> EstimatorSetup:
    """The estimator's settings, checked now (not at the first recalibration).

    ``estimator`` is ``None``, an :class:`~layerwise.sensitivity.EstimateOptions` (used as it
    is: every field explicit; its ``seed`` must stay at the default, the engine's ``seed=``
    seeds the probes) or a dict of its fields, which override the engine's defaults
    (``probes`` = :data:`DEFAULT_PROBES`, ``ggn_samples`` = :data:`DEFAULT_GGN_SAMPLES`,
    ``quantities`` = :func:`required_quantities` for ``loss_fn``) and
    may also hold the runtime callables ``batch_size`` and ``progress``. The engine's own
    arguments (``groups``, ``generator``, ``seed``) are refused, as are unknown keys.
    """
    if estimator is None:
        estimator = {}
    if isinstance(estimator, EstimateOptions):
        if estimator.seed != EstimateOptions().seed:
            raise ValueError(
                f"estimator: seed={estimator.seed!r} is set by the engine (the seed= argument "
                "seeds the probe generator); leave it at its default"
            )
        return EstimatorSetup(estimator, {})
    if not isinstance(estimator, Mapping):
        raise TypeError(
            "estimator must be a sensitivity.EstimateOptions or a dict of its fields, "
            f"got {estimator!r}"
        )
    owned = sorted(k for k in estimator if k in OWNED)
    if owned:
        raise ValueError(
            f"estimator: {owned} are set by the engine (groups from the optimizer, "
            "generator from seed=); leave them out"
        )
    known = [*(n for n in EstimateOptions.names() if n not in OWNED), *RUNTIME]
    unknown = sorted(str(k) for k in estimator if k not in known)
    if unknown:
        raise ValueError(f"estimator: unknown option(s) {unknown}; known: {sorted(known)}")
    runtime = {k: estimator[k] for k in RUNTIME if k in estimator}
    for name, value in runtime.items():
        if not callable(value):
            raise TypeError(f"estimator: {name} must be callable, got {value!r}")
    defaults = {
        "probes": DEFAULT_PROBES,
        "ggn_samples": DEFAULT_GGN_SAMPLES,
        "quantities": required_quantities(controller, loss_fn),
    }
    settings = {k: v for k, v in estimator.items() if k not in RUNTIME}
    options = EstimateOptions.from_dict({**defaults, **settings})
    return EstimatorSetup(options, runtime, "ggn_samples" not in settings)


def ggn_samples_for(options: EstimateOptions, per_example: bool) -> EstimateOptions:
    """``options`` with the engine's default label samples for a model whose sampled GGN
    terms are (``per_example``) or are not per example: :data:`DEFAULT_GGN_SAMPLES` where
    the spread of the per-example terms gives the standard error, else
    :data:`DEFAULT_GGN_SAMPLES_BATCH_STATISTICS`. Call it only for a default
    (``EstimatorSetup.ggn_samples_default``); an explicit ``ggn_samples`` is the user's."""
    wanted = DEFAULT_GGN_SAMPLES if per_example else DEFAULT_GGN_SAMPLES_BATCH_STATISTICS
    if "ggn_trace" not in options.quantities or options.ggn_samples == wanted:
        return options
    return options.replace(ggn_samples=wanted)


def samples_behind(report: Any, size: int, options: EstimateOptions) -> int:
    """Gradient samples M behind a rank's ``grad_variance``: the batch size for per-example
    gradients, else ``min(micro_batches, size)`` micro-batches
    (:mod:`layerwise.sensitivity.microbatch`)."""
    if report.settings.get("variance") in (None, "per_example"):
        return size
    return min(int(report.settings.get("micro_batches", options.micro_batches)), size)
