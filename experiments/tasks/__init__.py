"""Bundled benchmark tasks (MNIST-1D, scikit-learn digits, transfer, a sequence task)."""

from layerwise.experiments.tasks.base import (
    Budget,
    Recipe,
    Splits,
    Task,
    accuracy,
    cross_entropy,
    holdout,
)
from layerwise.experiments.tasks.registry import TASKS, get_task, register_task

__all__ = [
    "TASKS",
    "Budget",
    "Recipe",
    "Splits",
    "Task",
    "accuracy",
    "cross_entropy",
    "get_task",
    "holdout",
    "register_task",
]
