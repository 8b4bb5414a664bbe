"""Sensitivity estimators: per-group gradient statistics and Hutchinson Hessian traces.

This package imports nothing else of the project. It takes a model, a loss function
``loss_fn(model, batch) -> mean loss``, batches, and a plain mapping
``{group name: [parameter names]}``.
"""

from layerwise.sensitivity.errors import (
    DoubleBackwardError,
    MetaTensorError,
    NoGradientPathError,
    NonFloatingParameterError,
    NotMeasurableError,
)
from layerwise.sensitivity.estimate import estimate
from layerwise.sensitivity.factorised import ExampleNorms, example_norms
from layerwise.sensitivity.functional import FunctionalLoss, leaves_no_trace
from layerwise.sensitivity.groups import GroupIndex, default_groups, resolve_groups
from layerwise.sensitivity.hutchinson import hutchinson_samples, trace_estimate
from layerwise.sensitivity.hvp import HessianProduct
from layerwise.sensitivity.options import EstimateOptions
from layerwise.sensitivity.per_example import per_example_gradients
from layerwise.sensitivity.probes import draw_probes, make_generator
from layerwise.sensitivity.report import COLUMNS, EstimateCost, GroupEstimate, SensitivityReport
from layerwise.sensitivity.two_batch import NoiseEstimate, two_batch_noise
from layerwise.sensitivity.validation import QUANTITIES

__all__ = [
    "COLUMNS",
    "QUANTITIES",
    "DoubleBackwardError",
    "EstimateCost",
    "EstimateOptions",
    "ExampleNorms",
    "FunctionalLoss",
    "GroupEstimate",
    "GroupIndex",
    "HessianProduct",
    "MetaTensorError",
    "NoGradientPathError",
    "NoiseEstimate",
    "NonFloatingParameterError",
    "NotMeasurableError",
    "SensitivityReport",
    "default_groups",
    "draw_probes",
    "estimate",
    "example_norms",
    "hutchinson_samples",
    "leaves_no_trace",
    "make_generator",
    "per_example_gradients",
    "resolve_groups",
    "trace_estimate",
    "two_batch_noise",
]
