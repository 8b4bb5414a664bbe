"""Named learning-rate policies of an ablation, as plain data, and how each is built.

A policy spec is a small dict with a ``kind``:

* ``uniform``: every group at the base rate (the baseline of every comparison);
* ``layer_decay``: static factors ``decay ** (distance from the output)``
  (:func:`layerwise.policies.layer_decay`; keys ``decay``, ``min_factor``);
* ``discriminative``: static factors by role (:func:`layerwise.policies.discriminative`; keys
  ``head``, ``backbone``);
* ``factors``: an explicit ``{group: factor}`` table (key ``factors``, key ``default``);
* ``controller``: a :class:`layerwise.policies.SensitivityController` with ``rule`` (``curvature``,
  ``curvature_ggn``, ``noise``, ``trust_ratio``, ``curvature+noise``...), its settings under
  ``controller`` (flat
  keys such as ``alpha``, ``max_spread``, ``mode``, or nested ``bounds``/``safety`` tables), the
  estimator's settings under ``estimator`` (fields of
  :class:`layerwise.sensitivity.EstimateOptions`: ``probes``...), and the engine's
  ``recalibrate_every`` and ``warmup_steps``.

Every kind also takes two keys that change how each step is taken, and so compose with
any of the above (:func:`wrap_optimizer` applies them to the task's optimizer, under the
engine):

* ``sam = { rho = 0.05 }``: sharpness-aware steps (:class:`layerwise.engine.SAM`, Foret et
  al. 2021): each step is taken with the gradient at ``w + rho g/‖g‖``, at the cost of a
  second forward and backward pass per step (the training loop passes the closure);
* ``normalize_grads = true``: each group's gradient divided by its norm before the step
  (:class:`layerwise.engine.NormalizedGradients`), so a group's step size is its rate.

:data:`PRESETS` names the policies of the study; a config may list them by name, or
override a preset's keys in a ``[policies.NAME]`` table. ``curvature_ggn`` is the curvature
controller on the Gauss-Newton trace (``ggn_trace``, sampled labels), which needs the task's
loss to be a loss object (every bundled task's is a
:class:`layerwise.sensitivity.CrossEntropy`); the presets ``curvature`` and
``curvature+noise`` read the Hessian trace (rule ``curvature_hessian``: the engine's default
``curvature`` rule reads the GGN trace whenever the loss is a loss object, which would make
the ``curvature`` arm a copy of ``curvature_ggn``). A base
rate is never part of a policy: it is tuned per policy from the task's grid.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "KINDS",
    "PRESETS",
    "UPDATE_KEYS",
    "build_controller",
    "build_policy",
    "resolve_policy",
    "uses_closure",
    "wrap_optimizer",
]

KINDS = ("uniform", "layer_decay", "discriminative", "factors", "controller")

# The runner feeds the controller the validation *metric* (accuracy: higher is better), not
# the validation loss: on a task that overfits, the loss rises under every policy, and a
# fallback keyed to it would switch adaptation off for reasons that are not its own.
_CONTROLLER_DEFAULTS = {
    "recalibrate_every": 50,
    "warmup_steps": 50,
    "controller": {"mode": "max"},
    "estimator": {"probes": 8},
}

#: The policies of the study, by name.
PRESETS: dict[str, dict[str, Any]] = {
    "uniform": {"kind": "uniform"},
    "layer_decay": {"kind": "layer_decay", "decay": 0.75, "min_factor": 0.0},
    "discriminative": {"kind": "discriminative", "head": 1.0, "backbone": 0.3},
    **{
        name: {"kind": "controller", "rule": rule, **copy.deepcopy(_CONTROLLER_DEFAULTS)}
        for name, rule in (
            ("trust_ratio", "trust_ratio"),
            # the study's curvature arm is the Hessian-trace controller it measured; the rule
            # named "curvature" reads the GGN trace of a loss object (curvature_ggn's arm)
            ("curvature", "curvature_hessian"),
            ("curvature_ggn", "curvature_ggn"),
            ("noise", "noise"),
            ("curvature+noise", "curvature_hessian+noise"),
        )
    },
    "sam": {"kind": "uniform", "sam": {"rho": 0.05}},
    "normalized": {"kind": "uniform", "normalize_grads": True},
}

#: Keys every kind takes: how each step is taken (module docstring).
UPDATE_KEYS = frozenset({"sam", "normalize_grads"})
_SAM_KEYS = {"rho"}

_KEYS = {
    "uniform": {"kind"},
    "layer_decay": {"kind", "decay", "min_factor"},
    "discriminative": {"kind", "head", "backbone"},
    "factors": {"kind", "factors", "default"},
    "controller": {"kind", "rule", "recalibrate_every", "warmup_steps", "controller", "estimator"},
}


def resolve_policy(name: str, table: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The full spec of policy ``name``: its preset (if ``name`` is one, or ``table`` names
    one under ``preset``) updated by ``table``; validated, without building anything
    heavier than a controller.

    >>> resolve_policy("layer_decay", {"decay": 0.5})["decay"]
    0.5
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"policy name must be a non-empty string, got {name!r}")
    table = dict(table or {})
    preset_name = table.pop("preset", name if name in PRESETS else None)
    if preset_name is not None and preset_name not in PRESETS:
        raise ValueError(
            f"policy {name!r}: unknown preset {preset_name!r}; known: {sorted(PRESETS)}"
        )
    spec = copy.deepcopy(PRESETS[preset_name]) if preset_name else {}
    for key, value in table.items():
        if key == "controller" and isinstance(value, Mapping):
            value = _flat_controller(name, value)  # nested keys override the preset's flat ones
        if isinstance(value, Mapping) and isinstance(spec.get(key), Mapping):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    if "kind" not in spec:
        raise ValueError(
            f"policy {name!r}: not a preset ({', '.join(sorted(PRESETS))}) and no 'kind' "
            f"given; kinds: {', '.join(KINDS)}"
        )
    kind = spec["kind"]
    if kind not in KINDS:
        raise ValueError(f"policy {name!r}: unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    if kind == "controller":
        spec = {**copy.deepcopy(_CONTROLLER_DEFAULTS), **spec}
    unknown = set(spec) - _KEYS[kind] - UPDATE_KEYS
    if unknown:
        raise ValueError(
            f"policy {name!r}: unknown key(s) {sorted(unknown)} for kind {kind!r}; "
            f"known: {sorted(_KEYS[kind] | UPDATE_KEYS)}"
        )
    _validate(name, spec)
    return spec


def _flat_controller(name: str, table: Mapping[str, Any]) -> dict[str, Any]:
    from layerwise.policies.controller_config import flatten

    try:
        return flatten(table)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"policy {name!r}: {exc}") from exc


def _check_update(spec: Mapping[str, Any]) -> None:
    """``sam`` a table with a positive finite ``rho``; ``normalize_grads`` a boolean."""
    if "sam" in spec:
        sam = spec["sam"]
        if not isinstance(sam, Mapping) or set(sam) != _SAM_KEYS:
            raise ValueError(f"sam must be a table {{ rho = ... }}, got {sam!r}")
        rho = sam["rho"]
        if isinstance(rho, bool) or not isinstance(rho, int | float) or not 0 < rho < math.inf:
            raise ValueError(f"sam.rho must be a positive finite number, got {rho!r}")
    if not isinstance(spec.get("normalize_grads", False), bool):
        raise ValueError(f"normalize_grads must be true or false, got {spec['normalize_grads']!r}")


def _validate(name: str, spec: dict[str, Any]) -> None:
    kind = spec["kind"]
    try:
        _check_update(spec)
        if kind == "controller":
            if "rule" not in spec:
                raise ValueError("a controller policy needs a 'rule'")
            for key in ("controller", "estimator"):
                if not isinstance(spec[key], Mapping):
                    raise TypeError(f"{key} must be a table, got {spec[key]!r}")
            build_controller(spec)
            for key in ("recalibrate_every", "warmup_steps"):
                value = spec[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise ValueError(f"{key} must be a non-negative integer, got {value!r}")
            if spec["recalibrate_every"] < 1:
                raise ValueError(f"recalibrate_every must be >= 1, got {spec['recalibrate_every']}")
            _check_engine_options(spec)
        elif kind == "factors" and not isinstance(spec.get("factors"), Mapping):
            raise ValueError(
                f"a 'factors' policy needs a factors table, got {spec.get('factors')!r}"
            )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"policy {name!r}: {exc}") from exc


def _check_engine_options(spec: Mapping[str, Any]) -> None:
    """Let the engine check the estimator options now (over a one-layer probe model), with
    its own messages, so a bad option is refused with the config, not in every run."""
    import torch
    from torch import nn

    from layerwise import engine
    from layerwise.sensitivity import MeanSquaredError

    probe = nn.Linear(2, 2)
    engine.LayerwiseOptimizer(
        torch.optim.SGD(probe.parameters(), lr=0.1),
        model=probe,
        loss_fn=MeanSquaredError(_probe_outputs, torch.zeros_like),  # mean of outputs²
        controller=build_controller(spec),
        recalibrate_every=spec["recalibrate_every"],
        warmup_steps=spec["warmup_steps"],
        estimator=dict(spec["estimator"]),
    )


def _probe_outputs(model: Any, batch: Any) -> Any:
    return model(batch)


def build_controller(spec: Mapping[str, Any]) -> Any:
    """The :class:`layerwise.policies.SensitivityController` of a controller policy: its
    ``rule`` and the ``controller`` table, flat keys (``{ alpha = 0.5, max_spread = 4 }``) or
    nested ones (``bounds = {...}``, ``safety = {...}``); see
    :meth:`~layerwise.policies.SensitivityController.from_dict`."""
    from layerwise.policies import SensitivityController

    table = spec["controller"]
    if "rule" in table:
        raise ValueError(
            f"controller: 'rule' belongs to the policy (rule = {spec['rule']!r}), not to its "
            "controller table"
        )
    return SensitivityController.from_dict({**table, "rule": spec["rule"]})


def build_policy(spec: Mapping[str, Any], groups: Any) -> dict[str, Any]:
    """What realises ``spec`` over ``groups`` (a :class:`layerwise.policies.ParamGroups`):
    ``factors`` (``None`` or a dict, for :class:`layerwise.policies.LayerwiseLR`), and the
    keyword arguments of :class:`layerwise.engine.LayerwiseOptimizer`: ``controller``
    (``None`` or a controller) and, for controllers, ``recalibrate_every``,
    ``warmup_steps`` and ``estimator``."""
    from layerwise import policies

    kind = spec["kind"]
    out: dict[str, Any] = {"factors": None, "controller": None}
    if kind == "layer_decay":
        out["factors"] = policies.layer_decay(
            groups, spec.get("decay", 0.75), spec.get("min_factor", 0.0)
        )
    elif kind == "discriminative":
        out["factors"] = policies.discriminative(
            groups, head=spec.get("head", 1.0), backbone=spec.get("backbone", 0.3)
        )
    elif kind == "factors":
        out["factors"] = policies.validate_factors(
            groups, spec["factors"], default=spec.get("default")
        )
    elif kind == "controller":
        out["controller"] = build_controller(spec)
        out["recalibrate_every"] = spec["recalibrate_every"]
        out["warmup_steps"] = spec["warmup_steps"]
        out["estimator"] = dict(spec["estimator"])
    elif kind != "uniform":
        raise ValueError(f"spec: unknown policy kind {kind!r}")
    return out


def uses_closure(spec: Mapping[str, Any]) -> bool:
    """Whether the optimizer of ``spec`` needs ``step(batch, closure)`` (SAM does: its
    closure re-evaluates the loss and its gradients at the perturbed parameters)."""
    return "sam" in spec


def wrap_optimizer(spec: Mapping[str, Any], optimizer: Any) -> Any:
    """``optimizer`` wrapped for the update keys of ``spec`` (module docstring):
    ``SAM(NormalizedGradients(optimizer))`` with both, one of them, or ``optimizer`` itself
    with neither. SAM is outermost, so the gradient at the perturbed point is the one
    normalised. The engine wraps the result.

    >>> import torch
    >>> sgd = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    >>> type(wrap_optimizer(resolve_policy("sam"), sgd)).__name__
    'SAM'
    """
    from layerwise import engine

    if spec.get("normalize_grads", False):
        optimizer = engine.NormalizedGradients(optimizer)
    if "sam" in spec:
        optimizer = engine.SAM(optimizer, rho=spec["sam"]["rho"])
    return optimizer
