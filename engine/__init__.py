"""Engine: :class:`LayerwiseOptimizer` wraps a torch optimizer and applies per-group
multipliers from a controller, refreshed at each recalibration.

Modules, one concept each: :mod:`~layerwise.engine.optimizer` (the wrapper and its step),
:mod:`~layerwise.engine.multipliers` (apply for the step, restore exactly),
:mod:`~layerwise.engine.nonfinite` (the gradient check before each step),
:mod:`~layerwise.engine.recalibration` (estimate, decide, apply),
:mod:`~layerwise.engine.options` (controller and estimator options),
:mod:`~layerwise.engine.distributed` (pooling reports across DDP ranks),
:mod:`~layerwise.engine.checkpoint` (the engine's part of the optimizer state dict, composed
from its components' state dicts), :mod:`~layerwise.engine.base_state` (does a checkpoint fit
the wrapped optimizer), :mod:`~layerwise.engine.history` (the recalibration log
in memory), :mod:`~layerwise.engine.callbacks` (callbacks, TensorBoard writers),
:mod:`~layerwise.engine.batches` (estimation batches from an iterable),
:mod:`~layerwise.engine.preflight` (can the model be estimated: at construction and on the
first batch),
:mod:`~layerwise.engine.naming` (group and parameter names),
:mod:`~layerwise.engine.trainer_support` (what the trainer callbacks share). Wrappers of
the base optimizer that change how its step is taken, under the engine or alone:
:mod:`~layerwise.engine.sam` (sharpness-aware steps), :mod:`~layerwise.engine.normalized`
(per-group normalised gradients), on :mod:`~layerwise.engine.wrapping` (the delegation).

Trainer callbacks, imported on their own so that ``import layerwise.engine`` loads neither
``lightning`` nor ``transformers``: :class:`layerwise.engine.lightning.LayerwiseCallback` and
:class:`layerwise.engine.huggingface.LayerwiseCallback`.

Per-group schedules and factors are :class:`layerwise.policies.LayerwiseLR`, a torch
scheduler that composes with the engine; the history file is
:class:`layerwise.experiments.history_file.HistoryFile`, a callback.
"""

from layerwise.engine.callbacks import ScalarLogger, as_callback
from layerwise.engine.distributed import pool_reports
from layerwise.engine.history import HISTORY_COLUMNS, History, history_frame
from layerwise.engine.multipliers import MULTIPLIER_KEY, apply_multipliers, restore_multipliers
from layerwise.engine.nonfinite import NonFiniteGradientError
from layerwise.engine.normalized import NormalizedGradients
from layerwise.engine.optimizer import LayerwiseOptimizer
from layerwise.engine.options import (
    DEFAULT_GGN_SAMPLES,
    DEFAULT_GGN_SAMPLES_BATCH_STATISTICS,
    DEFAULT_PROBES,
    required_quantities,
)
from layerwise.engine.preflight import PreflightError
from layerwise.engine.recalibration import Recalibration
from layerwise.engine.sam import SAM
from layerwise.engine.wrapping import OptimizerWrapper

__all__: list[str] = [
    "DEFAULT_GGN_SAMPLES",
    "DEFAULT_GGN_SAMPLES_BATCH_STATISTICS",
    "DEFAULT_PROBES",
    "HISTORY_COLUMNS",
    "MULTIPLIER_KEY",
    "SAM",
    "History",
    "LayerwiseOptimizer",
    "NonFiniteGradientError",
    "NormalizedGradients",
    "OptimizerWrapper",
    "PreflightError",
    "Recalibration",
    "ScalarLogger",
    "apply_multipliers",
    "as_callback",
    "history_frame",
    "pool_reports",
    "required_quantities",
    "restore_multipliers",
]
