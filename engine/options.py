"""The engine's options: the controller, the estimator's options, and what a rule reads.

Quantities default to what the controller's rule reads (``curvature``: ``hessian_trace``;
``noise``: ``grad_variance``, which brings ``noise_to_signal``; ``trust_ratio``: nothing
beyond ``grad_norm`` and ``param_norm``), always with ``grad_norm`` (the controller's spike
check reads it), and ``"all"`` for a rule this module does not know.

Probes: :data:`DEFAULT_PROBES` = 4 Hutchinson probes per recalibration. With the default
interval (100 steps) this keeps the whole recalibration cost under 10% of training time on
the small CNN of ``python -m layerwise.experiments.benchmarks.engine`` (about 7%; 8 probes cost
about 15-20% there); the controller's smoothing pools the probes of successive recalibrations.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

__all__ = [
    "DEFAULT_PROBES",
    "estimator_options",
    "make_controller",
    "required_quantities",
    "samples_behind",
    "wants",
    "without",
]

#: Hutchinson probes per recalibration unless ``estimator={"probes": ...}`` says otherwise
#: (see the module docstring for why 4).
DEFAULT_PROBES = 4
_OWNED = ("model", "loss_fn", "batches", "groups", "generator", "seed")
_RULE_QUANTITIES = {
    "curvature": ("hessian_trace",),
    "noise": ("grad_variance",),
    "trust_ratio": (),
    "uniform": (),
}


def required_quantities(controller: Any) -> list[str] | str:
    """The report quantities the controller's rule reads (module docstring)."""
    name = getattr(getattr(controller, "rule", None), "name", None)
    if not isinstance(name, str):
        return "all"
    wanted = ["grad_norm"]
    for part in name.split("+"):
        if part not in _RULE_QUANTITIES:
            return "all"
        wanted += [q for q in _RULE_QUANTITIES[part] if q not in wanted]
    return wanted


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


def estimator_options(
    estimator: Mapping[str, Any] | None, controller: Any, model: Any, loss_fn: Any
) -> dict[str, Any]:
    """The keyword arguments for :func:`layerwise.sensitivity.estimate`, checked now (not at the
    first recalibration): known names only, none of those the engine sets, valid values."""
    from layerwise.sensitivity import estimate

    if estimator is None:
        estimator = {}
    if not isinstance(estimator, Mapping):
        raise TypeError(
            f"estimator must be a dict of sensitivity.estimate options, got {estimator!r}"
        )
    known = set(inspect.signature(estimate).parameters) - set(_OWNED)
    owned = sorted(k for k in estimator if k in _OWNED)
    unknown = sorted(k for k in estimator if k not in known and k not in _OWNED)
    if owned:
        raise ValueError(
            f"estimator: {owned} are set by the engine (groups from the optimizer, "
            "generator from seed=); leave them out"
        )
    if unknown:
        raise ValueError(f"estimator: unknown option(s) {unknown}; known: {sorted(known)}")
    options = {"probes": DEFAULT_PROBES, **estimator}
    options.setdefault("quantities", required_quantities(controller))
    _validate_now(estimate, model, loss_fn, options)
    return options


def _validate_now(estimate: Callable[..., Any], model: Any, loss_fn: Any, options: dict) -> None:
    """Check the estimator options at construction, not at the first recalibration, with
    the estimator's own checks (so the messages are its messages)."""
    from layerwise.sensitivity.hvp import HVP_MODES
    from layerwise.sensitivity.probes import DISTRIBUTIONS
    from layerwise.sensitivity.validation import check_options, check_quantities

    bound = inspect.signature(estimate).bind(model, loss_fn, None, **options)
    bound.apply_defaults()
    values = {
        k: v for k, v in bound.arguments.items() if k not in ("batches", "groups", "quantities")
    }
    check_options(**values, distributions=DISTRIBUTIONS, hvp_modes=HVP_MODES)
    check_quantities(options["quantities"])


def wants(quantities: Any, name: str) -> bool:
    return quantities == "all" or (not isinstance(quantities, str) and name in quantities)


def without(quantities: Any, name: str) -> list[str]:
    every = ["grad_norm", "grad_variance", "hessian_trace"]
    chosen = every if quantities == "all" else list(quantities)
    return [q for q in chosen if q != name]


def samples_behind(report: Any, size: int, options: Mapping[str, Any]) -> int:
    """Gradient samples M behind a rank's ``grad_variance``: the batch size for per-example
    gradients, else ``min(micro_batches, size)`` micro-batches
    (:mod:`layerwise.sensitivity.microbatch`)."""
    if report.settings.get("variance") in (None, "per_example"):
        return size
    return min(int(report.settings.get("micro_batches", options.get("micro_batches", 4))), size)
