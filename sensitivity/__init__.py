"""Sensitivity estimators: per-group gradient statistics, Hutchinson Hessian traces and
generalised Gauss-Newton traces.

This package imports nothing else of the project. It takes a model, a loss function
``loss_fn(model, batch) -> mean loss`` (or a loss object, :class:`CrossEntropy` or
:class:`MeanSquaredError`, which is one and also splits outputs from loss, as the GGN
needs; :func:`model_output_loss` for a model that returns its own loss), batches (tuples,
dicts, ``BatchEncoding``, dataclasses, nested), and a plain mapping
``{group name: [parameter names]}``.
"""

from layerwise.sensitivity.errors import (
    DoubleBackwardError,
    MetaTensorError,
    NoGradientPathError,
    NonFloatingParameterError,
    NotMeasurableError,
    PerExampleGradientError,
)
from layerwise.sensitivity.estimate import estimate
from layerwise.sensitivity.factorised import ExampleNorms, example_norms
from layerwise.sensitivity.functional import FunctionalLoss, leaves_no_trace
from layerwise.sensitivity.ggn import GGNLossError, GGNSizeError
from layerwise.sensitivity.groups import GroupIndex, default_groups, resolve_groups
from layerwise.sensitivity.hutchinson import hutchinson_samples, trace_estimate
from layerwise.sensitivity.hvp import HessianProduct
from layerwise.sensitivity.losses import CrossEntropy, MeanSquaredError, OutputLoss
from layerwise.sensitivity.model_losses import ModelOutputLoss, model_output_loss
from layerwise.sensitivity.options import EstimateOptions
from layerwise.sensitivity.per_example import per_example_gradients
from layerwise.sensitivity.probes import draw_probes, make_generator
from layerwise.sensitivity.report import COLUMNS, EstimateCost, GroupEstimate, SensitivityReport
from layerwise.sensitivity.two_batch import NoiseEstimate, two_batch_noise
from layerwise.sensitivity.validation import KNOWN_QUANTITIES, QUANTITIES
from layerwise.sensitivity.vmap_fallback import PerExampleFallbackWarning

__all__ = [
    "COLUMNS",
    "KNOWN_QUANTITIES",
    "QUANTITIES",
    "CrossEntropy",
    "DoubleBackwardError",
    "EstimateCost",
    "EstimateOptions",
    "ExampleNorms",
    "FunctionalLoss",
    "GGNLossError",
    "GGNSizeError",
    "GroupEstimate",
    "GroupIndex",
    "HessianProduct",
    "MeanSquaredError",
    "MetaTensorError",
    "ModelOutputLoss",
    "NoGradientPathError",
    "NoiseEstimate",
    "NonFloatingParameterError",
    "NotMeasurableError",
    "OutputLoss",
    "PerExampleFallbackWarning",
    "PerExampleGradientError",
    "SensitivityReport",
    "default_groups",
    "draw_probes",
    "estimate",
    "example_norms",
    "hutchinson_samples",
    "leaves_no_trace",
    "make_generator",
    "model_output_loss",
    "per_example_gradients",
    "resolve_groups",
    "trace_estimate",
    "two_batch_noise",
]
