"""Policies: parameter grouping, schedules, per-group factors and the sensitivity controller.

May use the report type of :mod:`sensitivity`; imports nothing else of the project.
"""

__all__: list[str] = []

# Each section below is owned by one module; add its re-exports in its own section.
# -- grouping --
from layerwise.policies.grouping import ParamGroup, ParamGroups
from layerwise.policies.grouping_strategies import group_parameters

__all__ += ["ParamGroup", "ParamGroups", "group_parameters"]
# -- schedules --
from layerwise.policies import schedules  # noqa: E402
from layerwise.policies.schedule_base import Schedule  # noqa: E402

__all__ += ["Schedule", "schedules"]
# -- factors --
from layerwise.policies.factors import discriminative, layer_decay, validate_factors  # noqa: E402

__all__ += ["discriminative", "layer_decay", "validate_factors"]
# -- scheduler --
from layerwise.policies.scheduler import LayerwiseLR  # noqa: E402

__all__ += ["LayerwiseLR"]
# -- controller --
from layerwise.policies.bounds import Bounds, apply_bounds  # noqa: E402
from layerwise.policies.controller import Decision, SensitivityController  # noqa: E402
from layerwise.policies.rules import RULES, Measurement, Rule, make_rule  # noqa: E402
from layerwise.policies.safety_settings import Safety  # noqa: E402

__all__ += [
    "RULES",
    "Bounds",
    "Decision",
    "Measurement",
    "Rule",
    "Safety",
    "SensitivityController",
    "apply_bounds",
    "make_rule",
]
