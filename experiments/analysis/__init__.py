"""Offline sensitivity analysis behind ``layerwise analyze``: ``inputs`` (the user's model,
checkpoint (``checkpoint``), data, loss and device), ``default`` (the bundled default),
``results`` (the policy's multipliers, the output files, the printed table)."""

from layerwise.experiments.analysis.default import bundled_default
from layerwise.experiments.analysis.inputs import Inputs, parse_device, user_inputs
from layerwise.experiments.analysis.results import OUTPUT_FILES, Analysis, check_out_dir, suggest

__all__ = [
    "OUTPUT_FILES",
    "Analysis",
    "Inputs",
    "bundled_default",
    "check_out_dir",
    "parse_device",
    "suggest",
    "user_inputs",
]
