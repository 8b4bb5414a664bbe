"""Sensitivity estimators: per-group gradient statistics and Hutchinson Hessian traces.

This package imports nothing else of the project. It takes a model, a loss function
``loss_fn(model, batch) -> mean loss``, batches, and a plain mapping
``{group name: [parameter names]}``.
"""

from .report import COLUMNS, EstimateCost, GroupEstimate, SensitivityReport

__all__ = ["COLUMNS", "EstimateCost", "GroupEstimate", "SensitivityReport"]
