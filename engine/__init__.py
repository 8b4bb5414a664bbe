"""Engine: :class:`LayerwiseOptimizer` wraps a torch optimizer and applies per-group
multipliers from a controller, refreshed at each recalibration.

Modules, one concept each: :mod:`~engine.optimizer` (the wrapper and its step),
:mod:`~engine.multipliers` (apply for the step, restore exactly), :mod:`~engine.recalibration`
(estimate, decide, apply), :mod:`~engine.options` (controller and estimator options),
:mod:`~engine.distributed` (pooling reports across DDP ranks), :mod:`~engine.checkpoint`
(the engine's part of the optimizer state dict), :mod:`~engine.history` (the recalibration
log and its CSV/Parquet file), :mod:`~engine.callbacks` (callbacks, TensorBoard writers),
:mod:`~engine.batches` (estimation batches from an iterable), :mod:`~engine.naming`
(group and parameter names).
"""

from .callbacks import ScalarLogger, as_callback
from .distributed import pool_reports
from .history import HISTORY_COLUMNS, History
from .multipliers import MULTIPLIER_KEY, apply_multipliers, restore_multipliers
from .optimizer import LayerwiseOptimizer
from .options import DEFAULT_PROBES, required_quantities

__all__: list[str] = [
    "DEFAULT_PROBES",
    "HISTORY_COLUMNS",
    "MULTIPLIER_KEY",
    "History",
    "LayerwiseOptimizer",
    "ScalarLogger",
    "apply_multipliers",
    "as_callback",
    "pool_reports",
    "required_quantities",
    "restore_multipliers",
]
